"""The one class order every cxrbench output uses, and the input normalisation every backend applies."""

CLASS_ORDER_NAME = "chexnet"

#: CheXNet order (Rajpurkar et al. 2017). Labels are matched to these names exactly after
#: splitting ``Finding Labels`` on ``|``: never by substring or regular expression.
CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(CLASSES)
NO_FINDING = "No Finding"

#: ImageNet statistics; gray images are replicated to three channels, then normalised.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
