"""The Lightning callbacks of a training run, one concern each.

``checkpointing``: ``BestCheckpoint`` (best.ckpt) and ``ResumePoint`` (last.ckpt, signals, requeue);
``divergence``: ``DivergenceGuard`` stops a diverging run; ``progress``: what the console shows;
``throughput``: img/s, ms/step and peak memory for run.json.
"""
