"""Training of draft heads on a frozen base model (`medusa-engine train-heads`).

Dependencies point down this list; no module imports one above it:

* `cli.py`: the command's flags (`add_arguments`, `run`, `main`); `pipeline.py`: its steps
  (records -> self-distillation -> examples -> training -> metrics), progress and report;
* `medusa.py`: Medusa heads' loss, training, held-out accuracy; `recurrent.py`: the same for
  recurrent heads, plus confidence temperatures, on cached base features (`features.py`);
* `loop.py`: the one optimisation loop both kinds share (optimizer, schedule, mixed precision,
  accelerate, progress callbacks, checkpoints, resume, a checkpoint on SIGINT / SIGTERM);
  `checkpoint.py`: training state on disk (safetensors + JSON, never pickle), the run's loss
  history and resumes included;
* `data.py`: records -> token ids + loss masks; `distill.py`: self-distillation data;
* `config.py`: `TrainConfig` (frozen; the flags map onto it, checked in `__post_init__`),
  `TrainError`, `TrainInterrupted`, `TrainResult`.
"""

from medusa_engine.training.config import TrainConfig, TrainError, TrainInterrupted, TrainResult

__all__ = ["TrainConfig", "TrainError", "TrainInterrupted", "TrainResult"]
