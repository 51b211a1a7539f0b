"""
"One process decides, every process learns it": the collectives d2persist's decisions share.

A decision that depends on files (which checkpoint to resume from, whether a run folder is
taken, whether training was already finished) is made on the main process only and sent to the
others, so every process acts on the same answer. When the decision fails, every process raises
the same one-sentence error instead of one process raising and the others hanging in the next
collective. Not distributed (or one process): plain calls, no collective.
"""

from typing import Callable, List, Optional, Tuple, Type, TypeVar, cast

from detectron2.utils import comm

from .errors import D2PersistError

__all__ = ["main_decides", "main_says", "all_compute"]

T = TypeVar("T")


def main_says(value: T) -> T:
    """
    The main process's ``value``, on every process. Collective when distributed: every process
    calls it at the same point (the value it passes is ignored except on the main process).
    """
    return comm.all_gather(value)[0] if comm.get_world_size() > 1 else value


def main_decides(
    decide: Callable[[], T], errors: Tuple[Type[BaseException], ...] = (D2PersistError,)
) -> T:
    """
    Run ``decide`` on the main process only; every process returns its result, or raises the
    error it raised. Collective when distributed.

    Args:
        decide: called without arguments on the main process; its result must be picklable.
        errors: the exceptions every process re-raises (the user's errors); any other exception
            propagates on the main process as it is.

    Returns:
        what ``decide`` returned on the main process.
    """
    result: Optional[T] = None
    error: Optional[BaseException] = None
    if comm.is_main_process():
        try:
            result = decide()
        except errors as e:
            error = e
    result, error = main_says((result, error))
    if error is not None:
        raise error
    return cast(T, result)  # no error: decide() returned it on the main process


def all_compute(compute: Callable[[], T], what: str) -> List[T]:
    """
    Run ``compute`` on every process; every process gets the list of all results (by rank), or
    raises when any process failed: the one that failed re-raises its error, the others a
    :class:`D2PersistError` naming it, instead of waiting for it in the next collective.
    Collective when distributed.

    Args:
        compute: called without arguments on every process; its result must be picklable.
        what (str): what is computed, for the sentence (e.g. "the validation loss").
    """
    result: Optional[T] = None
    failure: Optional[BaseException] = None
    try:
        result = compute()
    except Exception as e:  # every process must reach the gather
        failure = e
    if comm.get_world_size() == 1:
        if failure is not None:
            raise failure
        return [cast(T, result)]
    error = None if failure is None else f"{type(failure).__name__}: {failure}"
    said = comm.all_gather((result, error))
    if failure is not None:
        raise failure
    failed = [(rank, error) for rank, (_, error) in enumerate(said) if error is not None]
    if failed:
        rank, error = failed[0]
        raise D2PersistError(f"Process {rank} failed computing {what} ({error}).")
    return [cast(T, r) for r, _ in said]
