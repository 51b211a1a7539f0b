"""What ``verify`` finds wrong: one record per problem, read by ``ls``, the CLI and the tests."""

from dataclasses import dataclass

__all__ = ["Problem", "DAMAGED", "MISSING", "INCONSISTENT", "INCOMPLETE", "PROBLEM_KINDS"]

#: the file's bytes are not what they should be (hash, size, unreadable, unsafe, unparsable)
DAMAGED = "damaged"
#: a file that something names is not there
MISSING = "missing"
#: files that each verify but disagree (``last_checkpoint``, ``best.json``)
INCONSISTENT = "inconsistent"
#: a bundle without its manifest: an export that never completed
INCOMPLETE = "incomplete"
PROBLEM_KINDS = (DAMAGED, MISSING, INCONSISTENT, INCOMPLETE)


@dataclass(frozen=True)
class Problem:
    """One problem :meth:`~d2persist.artifacts.view.RunView.verify` found."""

    #: the file it is about, as the view names it (a local path or a URL)
    path: str
    #: one of :data:`PROBLEM_KINDS`
    kind: str
    #: one sentence for the user, naming the file
    sentence: str

    def __post_init__(self):
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"Problem kind must be one of {PROBLEM_KINDS}, not {self.kind!r}.")

    def __str__(self) -> str:
        return self.sentence
