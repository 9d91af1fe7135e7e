"""musetalk-job: MuseTalk v1.5 lip-sync as one job per GPU.

Public surface:
- ``musetalk_job.pipeline.Pipeline``: the engine (models loaded once, ``run`` per job).
- ``musetalk_job.job.JobSpec``: the validated job specification used by every entry point.
- ``musetalk_job.errors``: the exit codes and the exceptions that carry them.
- the ``musetalk-job`` console script (``musetalk_job.cli``).
"""

__version__ = "0.1.0"
