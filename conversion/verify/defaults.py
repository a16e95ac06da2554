"""The command's defaults, apart from everything heavy: ``resnet34-parity --help`` reads them without TensorFlow."""

DEFAULT_BATCH, DEFAULT_SIZE = 2, (224, 224)  # verify
DEFAULT_TRAIN_BATCH, DEFAULT_TRAIN_SIZE = 4, (45, 38)  # verify --train: small, odd and non-square
DEFAULT_TRAIN_STEPS = 10
TRAIN_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop", "nadam", "adamax", "adagrad", "adadelta", "lion")
# Adadelta's rate scales a step that is already ~sqrt(epsilon)-sized; Lion's step is the rate itself (a sign).
DEFAULT_LEARNING_RATE = {
    "sgd": 0.002,
    "nesterov": 0.002,
    "adam": 1e-3,
    "adamw": 1e-3,
    "rmsprop": 1e-3,
    "nadam": 1e-3,
    "adamax": 1e-3,
    "adagrad": 1e-2,
    "adadelta": 1.0,
    "lion": 1e-4,
}
DEFAULT_WEIGHT_DECAY = 1e-4
