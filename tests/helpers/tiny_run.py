"""The smallest whole run the end-to-end tests share: a tiny DenseNet on a 120-image phantom at 32 px."""

TINY_RUN = [
    "--arch", "densenet-tiny", "--image-size", "32", "--batch-size", "4",
    "--set", "data.phantom_images=120", "--set", "data.phantom_size=64",
    "--set", "eval.bootstrap_rounds=10", "--set", "eval.cam_images=2",
]  # fmt: skip
