"""The default limits of reading pictures and of the scoring service: the commands' options default to them, and
the modules that read pictures and serve them enforce them."""

#: Pixels of one picture (a 6000 x 6000 radiograph is 36 M; NIH's are 1024 x 1024), and upload bytes.
MAX_PIXELS, MAX_BYTES = 50_000_000, 32 * 1024 * 1024
#: The service's batching and queue defaults: ``predict``'s batch size, a wait short next to one DenseNet-121 call
#: (tens of ms and more on a CPU), and room for four full batches.
MAX_BATCH, MAX_BATCH_DELAY_MS, MAX_QUEUE = 16, 5.0, 64
