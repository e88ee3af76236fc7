"""Training: the trainer's config, state, one optimizer step, validation, checkpoints (save,
resume, export), EMA, LR schedule, tracking, fault injection, speed choices and the loop; the
objects one run shares travel as one :class:`restorer.train.context.TrainContext`.

``launch/train.py`` is the command (``accelerate launch launch/train.py --help``);
:func:`restorer.train.loop.train` is the run itself, read top to bottom. Import from the modules
(``restorer.train.step``, ``restorer.train.checkpoint`` ...): this package exports nothing itself.
"""
