"""The NIH reader and image decoding, on generated files in every format variant NIH has shipped."""

from __future__ import annotations

import numpy as np
import pytest

from cxrbench.data import images, nih
from cxrbench.data.classes import CLASSES
from cxrbench.errors import DataError
from helpers.nih_files import Entry, entries, gray_pattern, image_path, truncate, write_dataset, write_png

LABELS = (
    "No Finding",
    "Effusion",
    "Atelectasis|Effusion",
    "Hernia",
    "Pleural_Thickening|Mass",
    "No Finding",
    "Infiltration",
)


def expected_vector(text: str) -> list[int]:
    """Independent of the reader: the class indicator row for a ``Finding Labels`` text."""
    parts = set(text.split("|"))
    return [int(c in parts) for c in CLASSES]


def dataset(tmp_path, **options):
    items = options.pop("items", None) or entries(patients=12, per_patient=3, label_cycle=LABELS)
    root = write_dataset(tmp_path / "nih", items, test_patients=options.pop("test_patients", (2, 5, 9)), **options)
    return root, items


@pytest.mark.parametrize("variant", ["2017", "v2020"])
@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_reads_labels_patients_views_and_paths(tmp_path, variant, layout):
    root, items = dataset(tmp_path, variant=variant, layout=layout)
    index = nih.read_index(root)
    assert index.files == sorted(e.name for e in items)
    by_name = {e.name: e for e in items}
    assert index.labels.tolist() == [expected_vector(by_name[f].labels) for f in index.files]
    assert index.patients.tolist() == [by_name[f].patient for f in index.files]
    assert all(p.name == f and p.is_file() for p, f in zip(index.paths, index.files))
    test_rows = index.rows("test")
    assert sorted(set(index.patients[test_rows])) == [2, 5, 9]
    assert len(test_rows) == 9
    assert index.missing == [] and index.excluded == []


def test_trailing_comma_and_v2020_give_the_same_index(tmp_path):
    a = nih.read_index(dataset(tmp_path / "a", variant="2017")[0])
    b = nih.read_index(dataset(tmp_path / "b", variant="v2020")[0])
    assert a.files == b.files and (a.labels == b.labels).all() and (a.split == b.split).all()


def test_prefers_v2020_when_both_files_exist(tmp_path):
    root, items = dataset(tmp_path, variant="v2020")
    first = items[0]
    (root / "Data_Entry_2017.csv").write_text(
        f"Image Index,Finding Labels,Patient ID,View Position,\n{first.name},Hernia,{first.patient},PA,\n"
    )
    index = nih.read_index(root)
    assert len(index) == len(items)
    assert index.labels[index.files.index(first.name)].tolist() == expected_vector(first.labels)


def test_rows_are_sorted_by_file_name(tmp_path):
    items = entries(patients=6, per_patient=2, label_cycle=LABELS)
    root = write_dataset(tmp_path / "nih", items[::-1], test_patients=(1, 2))
    assert nih.read_index(root).files == sorted(e.name for e in items)


@pytest.mark.parametrize("column", nih.REQUIRED_COLUMNS)
def test_missing_column_names_file_and_column(tmp_path, column):
    root, _ = dataset(tmp_path, drop_columns=[column])
    with pytest.raises(DataError, match=rf"Data_Entry_2017\.csv: missing column '{column}'"):
        nih.read_index(root)


def test_unknown_label_names_file_line_and_label(tmp_path):
    items = entries(patients=4, per_patient=1, label_cycle=["Effusion"])
    items[2] = Entry(items[2].name, "Effusion|Pleural Thickening", items[2].patient)  # the Microsoft typo
    root = write_dataset(tmp_path / "nih", items, test_patients=(1,))
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv, line 4: unknown label 'Pleural Thickening'"):
        nih.read_index(root)


def test_no_finding_cannot_be_combined(tmp_path):
    items = entries(patients=3, per_patient=1, label_cycle=["No Finding|Mass"])
    with pytest.raises(DataError, match="line 2: unknown label 'No Finding' \\(cannot be combined"):
        nih.read_index(write_dataset(tmp_path / "nih", items, test_patients=(1,)))


def test_boxes_map_infiltrate_and_scale_to_the_png(tmp_path):
    items = entries(patients=4, per_patient=2, label_cycle=["Infiltration|Mass"])
    boxed = items[0].name
    boxes = [(boxed, "Infiltrate", 512.0, 256.0, 128.0, 64.0), (boxed, "Mass", 0, 1024, 1024, 32.5)]
    root = write_dataset(tmp_path / "nih", items, test_patients=(1,), boxes=boxes, size=32)
    index = nih.read_index(root)
    assert [(b.image, b.label) for b in index.boxes] == [(boxed, "Infiltration"), (boxed, "Mass")]
    infiltrate = index.boxes[0]
    assert (infiltrate.x, infiltrate.y, infiltrate.w, infiltrate.h) == (16.0, 8.0, 4.0, 2.0)
    assert (infiltrate.frame_w, infiltrate.frame_h) == (32, 32)
    assert index.boxes[1].h == pytest.approx(32.5 / 32)


def test_box_with_unknown_label_is_an_error(tmp_path):
    items = entries(patients=3, per_patient=1, label_cycle=["Mass"])
    root = write_dataset(tmp_path / "nih", items, test_patients=(1,), boxes=[(items[0].name, "Masses", 1, 2, 3, 4)])
    with pytest.raises(DataError, match=r"BBox_List_2017\.csv, line 2: unknown label 'Masses'"):
        nih.read_index(root)


def test_missing_images_are_dropped_with_a_warning(tmp_path):
    items = entries(patients=6, per_patient=2, label_cycle=LABELS)
    gone = [items[1].name, items[7].name]
    root = write_dataset(tmp_path / "nih", items, test_patients=(1, 2), not_written=gone)
    with pytest.warns(nih.DataWarning, match="2 images listed in the entry file were found in no images folder"):
        index = nih.read_index(root)
    assert index.missing == sorted(gone)
    assert not set(gone) & set(index.files) and len(index) == len(items) - 2


def test_exclusion_list_drops_images_and_warns_about_unknown_names(tmp_path):
    root, items = dataset(tmp_path)
    dropped = [items[0].name, items[10].name]
    exclude = tmp_path / "poor_quality.txt"
    exclude.write_text(f"# poor quality\n\n{dropped[0]}\n  {dropped[1]}  \nnot_in_this_set.png\n")
    with pytest.warns(nih.DataWarning, match="1 of 3 excluded names are not in this data set"):
        index = nih.read_index(root, exclude=exclude)
    assert index.excluded == sorted(dropped)
    assert len(index) == len(items) - 2 and not set(dropped) & set(index.files)


def test_exclusion_list_matching_nothing_is_an_error(tmp_path):
    root, _ = dataset(tmp_path)
    exclude = tmp_path / "wrong.txt"
    exclude.write_text("a.png\nb.png\n")
    with pytest.raises(DataError, match=r"wrong\.txt: none of its 2 names"):
        nih.read_index(root, exclude=exclude)


def test_empty_split_names_the_split(tmp_path):
    root, items = dataset(tmp_path, test_patients=(3,))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("".join(f"{e.name}\n" for e in items if e.patient == 3))
    with pytest.raises(DataError, match="split 'test' is empty"):
        nih.read_index(root, exclude=exclude)


def test_patient_in_both_lists_keeps_the_test_images(tmp_path):
    root, items = dataset(tmp_path, test_patients=(2, 5))
    leaked = next(e for e in items if e.patient == 7)
    with open(root / "test_list.txt", "a") as f:
        f.write(f"{leaked.name}\n")
    with pytest.warns(nih.DataWarning, match="1 patients appear in both"):
        index = nih.read_index(root)
    patient7 = index.split[index.patients == 7]
    assert patient7.tolist() == ["test"]
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not set(index.patients[index.rows(a)]) & set(index.patients[index.rows(b)])


def test_patient_id_prefix_mismatch_is_noted(tmp_path):
    items = entries(patients=5, per_patient=2, label_cycle=LABELS)
    items[3] = Entry(items[3].name, items[3].labels, 99)
    with pytest.warns(nih.DataWarning, match="1 images have a file-name prefix other than their Patient ID"):
        index = nih.read_index(write_dataset(tmp_path / "nih", items, test_patients=(1,)))
    assert index.patients[index.files.index(items[3].name)] == 99


def test_official_split_needs_its_lists(tmp_path):
    root, _ = dataset(tmp_path)
    (root / "test_list.txt").unlink()
    with pytest.raises(DataError, match=r"test_list\.txt: not found"):
        nih.read_index(root)
    assert len(nih.read_index(root, split="random-70-10-20")) == 36


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_every_png_mode_decodes_to_the_same_gray(tmp_path, mode):
    path = tmp_path / f"{mode.replace(';', '')}.png"
    gray = gray_pattern(path.name, 40)
    write_png(path, gray, mode)
    decoded = images.decode_gray(path)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, gray)


def test_sixteen_bit_uses_the_full_range(tmp_path):
    from PIL import Image

    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert images.decode_gray(tmp_path / "wide.png").tolist() == [[0, 1, 128, 255]]


def test_truncated_png_names_the_file(tmp_path):
    path = tmp_path / "00000001_000.png"
    write_png(path, gray_pattern(path.name, 64), "L")
    truncate(path)
    with pytest.raises(DataError, match=r"00000001_000\.png: unreadable image"):
        images.decode_gray(path)


def test_resize_matches_pillow_bilinear(tmp_path):
    from PIL import Image

    gray = gray_pattern("x.png", 96)
    expected = np.asarray(Image.fromarray(gray).resize((24, 24), Image.Resampling.BILINEAR))
    assert np.array_equal(images.resize_gray(gray, 24), expected)
    # A reducing filter averages: a 4x reduction of a checkerboard is flat mid-gray, not aliased.
    checker = (np.indices((96, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert np.abs(images.resize_gray(checker, 24).astype(int) - 128).max() <= 2


def test_png_size_reads_the_header_only(tmp_path):
    path = image_path(tmp_path, 0, "a.png", "flat")
    write_png(path, np.zeros((20, 30), np.uint8), "L")
    assert images.png_size(path) == (30, 20)
    (tmp_path / "b.png").write_bytes(b"not a png at all, just text....")
    with pytest.raises(DataError, match=r"b\.png: not a PNG"):
        images.png_size(tmp_path / "b.png")
