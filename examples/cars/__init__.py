"""What ``examples/train_cars.py`` leans on, one topic per module.

``config`` (the settings and their checks, the command line), ``data`` (Stanford Cars layouts,
few-shot sampling), ``clip`` (open_clip models and image features), ``files`` (run folders,
checkpoints, metrics, logs), ``schedule`` (the learning rate's), ``distributed`` (``torchrun``),
``plots`` (pictures), ``demo`` (the synthetic world of ``--demo``) and ``grid`` (the field's
protocols as a grid of runs). The method itself, every call into promptmix, is in
``train_cars.py``.
"""


class Stopped(Exception):
    """Training stopped before its end, said in one line: ``status`` 1 (a non-finite loss) or 130
    (Ctrl-C)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class UsageError(Exception):
    """Input the example cannot use: each message becomes one ``train_cars.py: error:`` line."""

    def __init__(self, *messages: str):
        super().__init__("\n".join(messages))
        self.messages = list(messages)
