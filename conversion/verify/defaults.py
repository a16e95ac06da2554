"""The command's defaults, apart from everything heavy: ``resnet34-parity --help`` reads them without TensorFlow."""

DEFAULT_BATCH, DEFAULT_SIZE = 2, (224, 224)  # verify
DEFAULT_TRAIN_BATCH, DEFAULT_TRAIN_SIZE = 4, (45, 38)  # verify --train: small, odd and non-square
DEFAULT_TRAIN_STEPS = 10
TRAIN_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
DEFAULT_LEARNING_RATE = {"sgd": 0.002, "nesterov": 0.002, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}
DEFAULT_WEIGHT_DECAY = 1e-4
