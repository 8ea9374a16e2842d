"""imgtocap's training pipeline: the DVC stages (`training.stages`) over libraries named for their
concern (`data`, `evaluation`, `tracking`, `runtime`); `params` and `paths` are what they share.

Libraries raise; only a stage's `main()` exits. A `StageError` is a failure whose message says
all there is to do, and `training.params.stage_main` ends the stage with it and exit status 1.
"""


class StageError(Exception):
    """A failure the user fixes from its message alone (data that failed validation, weights
    that cannot be had, a workspace another trainer holds, a torchrun worker that failed).

    A stage's `main()` (`@stage_main`) prints the message to stderr and exits with status 1:
    a traceback would only bury it. Called as a library, it is an exception like any other.
    """
