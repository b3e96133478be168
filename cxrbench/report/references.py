"""Published numbers the report sets beside every run, each with its source.

They are quoted, never computed: a reader sees at a glance how far a run is from the study it
reproduces. Classes are named exactly as in :data:`cxrbench.data.classes.CLASSES`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """One column of published numbers, with where it comes from."""

    name: str
    source: str
    per_class: dict[str, float]
    mean: float | None


#: Rajpurkar et al. 2017, "CheXNet", Table 1 (random 70/10/20 patient split, DenseNet-121 at 224 px).
CHEXNET = Reference(
    name="CheXNet",
    source="Rajpurkar et al. 2017, CheXNet, Table 1",
    per_class={
        "Atelectasis": 0.8094,
        "Cardiomegaly": 0.9248,
        "Effusion": 0.8638,
        "Infiltration": 0.7345,
        "Mass": 0.8676,
        "Nodule": 0.7802,
        "Pneumonia": 0.7680,
        "Pneumothorax": 0.8887,
        "Consolidation": 0.7901,
        "Edema": 0.8878,
        "Emphysema": 0.9371,
        "Fibrosis": 0.8047,
        "Pleural_Thickening": 0.8062,
        "Hernia": 0.9164,
    },
    mean=0.8414,
)

#: The Microsoft blog post this project grew from (DenseNet-121 in Keras and PyTorch): its per-class table.
MICROSOFT_POST = Reference(
    name="Microsoft post",
    source="Microsoft blog post, DenseNet-121 in Keras and PyTorch, per-class AUROC table",
    per_class={
        "Atelectasis": 0.828543,
        "Cardiomegaly": 0.891449,
        "Effusion": 0.817697,
        "Infiltration": 0.907302,
        "Mass": 0.895815,
        "Nodule": 0.907841,
        "Pneumonia": 0.817601,
        "Pneumothorax": 0.881838,
        "Consolidation": 0.721818,
        "Edema": 0.868002,
        "Emphysema": 0.787202,
        "Fibrosis": 0.826822,
        "Pleural_Thickening": 0.793416,
        "Hernia": 0.889089,
    },
    mean=0.845,
)

AUROC_REFERENCES = (CHEXNET, MICROSOFT_POST)

#: Wang et al. 2017 (ChestX-ray8), localisation accuracy of their ChestX-ray14 model at T(IoBB) = 0.5.
CHESTXRAY8_IOBB_05 = Reference(
    name="ChestX-ray8 T(IoBB)=0.5",
    source="Wang et al. 2017, ChestX-ray8, localisation accuracy at T(IoBB)=0.5",
    per_class={
        "Atelectasis": 0.194,
        "Cardiomegaly": 0.945,
        "Effusion": 0.418,
        "Infiltration": 0.650,
        "Mass": 0.306,
        "Nodule": 0.000,
        "Pneumonia": 0.483,
        "Pneumothorax": 0.265,
    },
    mean=None,
)
CHESTXRAY8_THRESHOLD = "0.5"
