"""
What the command-line tools share: the launcher (detectron2's ``launch()`` or torchrun's
environment), run setup, and known errors as one line + exit code 2.

Exit codes of the training tools: 0 training completed; 2 bad input, the run folder is being
written by another run, or a file the machine refuses (one sentence on stderr); 3 training
diverged (NaN/Inf: one sentence naming the iteration and the last good checkpoint); 128 + N
stopped by signal N (one of ``PERSIST.STOP_SIGNALS``) after saving a resumable checkpoint, e.g.
143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT; 1 any other failure (a traceback).
"""

import argparse
import errno
import functools
import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

if TYPE_CHECKING:
    from detectron2.config import CfgNode
    from omegaconf import DictConfig

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DIVERGED",
    "exit_on_known_errors",
    "setup_run",
    "add_launch_arguments",
    "add_predictor_arguments",
    "add_threshold_argument",
    "check_weights",
    "positive_int",
    "positive_number",
    "non_negative_number",
    "port_number",
    "launch_main",
    "launched_by_torchrun",
]

#: The environment a launcher such as torchrun sets for each worker (torch.distributed's
#: ``env://`` contract, and the per-machine size detectron2's local process group needs).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")

#: Exit code for bad input or bad artifacts.
EXIT_BAD_INPUT = 2
#: Exit code for a training run that diverged (NaN or Inf).
EXIT_DIVERGED = 3

F = TypeVar("F", bound=Callable[..., Any])


def exit_on_known_errors(prog: str) -> Callable[[F], F]:
    """
    Decorate a tool's ``main``: a :class:`D2PersistError` is printed as one line on stderr and
    exits with code 2 (3 for a diverged run), and so does a file the machine refuses (a full
    disk, a quota, a permission, a read-only disk: its name and why); Ctrl-C exits with 130
    without a traceback.
    """

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from .errors import D2PersistError, TrainingDivergedError

            try:
                return fn(*args, **kwargs)
            except D2PersistError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                _exit(EXIT_DIVERGED if isinstance(e, TrainingDivergedError) else EXIT_BAD_INPUT)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                _exit(130)
            except OSError as e:
                sentence = _file_error(e)
                if sentence is None:
                    raise
                print(f"{prog}: error: {sentence}", file=sys.stderr)
                _exit(EXIT_BAD_INPUT)

        return wrapper

    return decorator


def _leave_process_group():
    """Tear down this worker's process group, if it has one (the normal end of a worker)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: what the machine refuses a tool that reads or writes a file: a full disk, a quota, a
#: permission, a read-only file system (others, which a bug of its own may cause too, keep
#: their traceback)
_FILE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS}


def _file_error(e: OSError) -> Optional[str]:
    """One sentence for an OSError about a named file the machine refused, else None."""
    if e.errno not in _FILE_ERRNOS or not e.filename:
        return None
    sentence = f"{e.filename}: {e.strerror or os.strerror(e.errno)}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return sentence + (" (every file written before is whole; make room, then run the same "
                           "command again).")
    return sentence + "."


def _exit(code):
    """
    Exit with ``code``. A worker of a multi-process run leaves with ``os._exit`` once its output
    is flushed: exiting normally with the process group's threads alive, or while its peer
    tears the group down, sometimes aborts in C++ ("terminate called without an active
    exception", 1 in 4 refused starts here under launch()), and launch() then reports SIGABRT
    instead of the error's exit code.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def setup_run(cfg: Union["CfgNode", "DictConfig"], args: argparse.Namespace) -> None:
    """
    detectron2's ``default_setup`` without its config dump: PersistHook writes config.yaml
    itself, atomically, after checking it loads back, and only once the run is known not to
    overwrite another.
    """
    import torch
    from detectron2.utils import comm
    from detectron2.utils.collect_env import collect_env_info
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    from .collective import main_says
    from .files.lock import restarted_run_started
    from .runconfig import run_config
    from .training.resume import hold_run_lock

    run = run_config(cfg)
    run.check_settings()  # before the folder is made and anything built
    output_dir = run.output_dir
    restarted = getattr(args, "restarted", 0) and not getattr(args, "eval_only", False)
    if restarted and not args.resume:
        # a worker torchrun restarted continues the run its job started (never starts it
        # over); not one that an earlier attempt was refused (that error repeats)
        started = comm.is_main_process() and restarted_run_started(output_dir)
        args.resume = main_says(started)
        if args.resume and comm.is_main_process():
            print(f"torchrun restart {args.restarted}: resuming from the newest checkpoint "
                  "that verifies.", file=sys.stderr)
    if not getattr(args, "eval_only", False):
        hold_run_lock(output_dir)  # before the log file: a second writer writes nothing
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="d2persist")
    logger = setup_logger(output_dir, distributed_rank=rank)
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", collect_env_info())
    logger.info("Command line arguments: %s", args)
    seed = run.seed
    seed_all_rng(None if seed < 0 else seed + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = run.cudnn_benchmark
    logging.getLogger("d2persist").setLevel(logging.INFO)
    loop = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _KnownErrorAsSentence) for f in loop.filters):
        loop.addFilter(_KnownErrorAsSentence())


class _KnownErrorAsSentence(logging.Filter):
    """
    detectron2's loop logs "Exception during training:" with the traceback of whatever ended
    training; a :class:`D2PersistError` (the user's error, printed as one line on stderr by
    the tool) is logged as its sentence instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from .errors import D2PersistError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, D2PersistError):
            record.msg, record.args = "Training stopped: %s", (str(error),)
            record.exc_info, record.exc_text = None, None
        return True


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """
    Add ``--dist-timeout`` to a ``default_argument_parser()``: seconds a process waits in a
    collective (and at start-up for the others) before the run fails, as ``launch(timeout=)``.
    """
    parser.add_argument(
        "--dist-timeout", type=positive_number, default=30 * 60, metavar="SECONDS",
        help="fail a multi-process run whose processes wait on each other this long "
        "(detectron2's default: 1800)",
    )
    return parser


def check_weights(weights: str, output_dir: str, resume: bool, key: str,
                  needed: bool = False) -> None:
    """
    Refuse, before the model is built, weights that cannot be loaded: a local file that does
    not exist, or none at all where some are ``needed`` (``--eval-only``: a model of random
    weights would be scored as if trained). Nothing is asked of them where ``resume`` finds a
    checkpoint in ``output_dir`` (that is loaded instead).

    Args:
        weights (str): ``MODEL.WEIGHTS`` / ``train.init_checkpoint`` (a path or a URL).
        output_dir (str): the run's folder.
        resume (bool): ``--resume``.
        key (str): the config's name of ``weights``, for the sentence.
        needed (bool): weights are required (evaluation).

    Raises:
        ConfigError: such weights.
    """
    from .artifacts.view import list_checkpoints
    from .collective import main_decides
    from .errors import ConfigError

    def decide() -> None:  # the main process's folder and files, as resume_or_load decides
        if weights:  # with --resume, read only if no checkpoint (nor the mirror's) is found
            if not resume and "://" not in weights and not os.path.isfile(weights):
                raise ConfigError(f"{key} {weights} does not exist.")
        elif needed and not (resume and os.path.isdir(output_dir)
                             and list_checkpoints(output_dir)):
            raise ConfigError(f"Nothing to evaluate: {key} is empty and no checkpoint is "
                              f"resumed from {output_dir}; set {key}, or add --resume for the "
                              "run's newest checkpoint (a model of random weights would be "
                              "scored).")

    main_decides(decide)  # every process launched hears the same (a hang otherwise)


def _argument(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from ``convert``, whose D2PersistError becomes argparse's error."""
    def parse(text: str) -> Any:
        from .errors import D2PersistError

        try:
            return convert(text)
        except D2PersistError as e:  # (in argparse's style: "argument --x: a ..., not '7'")
            message = str(e).rstrip(".")
            raise argparse.ArgumentTypeError(message[:1].lower() + message[1:]) from None

    parse.__name__ = convert.__name__  # (argparse names the type in some errors)
    return parse


def _ranged(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str,
            name: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` where ``ok`` of it, else one sentence."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = (f"``text`` as {what}.\n\n    Raises:\n        argparse.ArgumentTypeError: "
                     "anything else, in one sentence.\n    ")
    return parse


#: a count option (workers, replicas, images, bytes)
positive_int = _ranged(int, lambda v: v >= 1, "a whole number of at least 1", "positive_int")
#: CPUs to reserve
positive_number = _ranged(float, lambda v: 0 < v < math.inf, "a number above 0",
                          "positive_number")
#: GPUs to reserve
non_negative_number = _ranged(float, lambda v: 0 <= v < math.inf, "a number of at least 0",
                              "non_negative_number")
#: a TCP port
port_number = _ranged(int, lambda v: 1 <= v <= 65535, "a port from 1 to 65535", "port_number")


def add_threshold_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--confidence-threshold``, as every tool that writes predictions takes it."""
    from .layout import DEFAULT_MIN_SCORE
    from .predict.outputs import min_score_of

    parser.add_argument("--confidence-threshold", type=_argument(min_score_of),
                        default=DEFAULT_MIN_SCORE,
                        help="minimum score of the instances written (default: "
                        f"{DEFAULT_MIN_SCORE})")
    return parser


def add_predictor_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """
    Add what chooses a predictor, as every prediction tool and command takes it:
    ``--backend``, ``--precision``, ``--device`` (see :func:`d2persist.load_predictor`).
    """
    from .layout import BACKENDS, PRECISIONS

    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="pytorch: evaluation-exact, needs torch and detectron2; "
                        "onnxruntime: the export's model.onnx, needs neither; auto (default): "
                        "pytorch where torch and detectron2 are installed, else onnxruntime")
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                        help="int8: the export's model.int8.onnx (onnxruntime backend)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="pytorch: default cuda if available, else cpu; onnxruntime: cuda "
                        "uses its CUDA provider (onnxruntime-gpu), refused where it has none")
    return parser


def launched_by_torchrun() -> bool:
    """
    Whether torchrun (``torch.distributed.run``) or another launcher that sets torch's
    environment contract (:data:`TORCHRUN_ENV`) started this process as one of its workers.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_torchelastic_launched():
        return True
    return all(k in os.environ for k in TORCHRUN_ENV)


def _torchrun_worker(main, args):
    """
    Run ``main(args)`` as the worker torchrun started: join its process group (gloo on the
    CPU, nccl on GPUs) and set up detectron2's per-machine group, as ``launch()``'s workers do.
    After a restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the run resumes by itself.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    ignored = [f"--{k.replace('_', '-')} {getattr(args, k)}"
               for k, default in (("num_gpus", 1), ("num_machines", 1), ("machine_rank", 0))
               if getattr(args, k, default) != default]
    if ignored and rank == 0:
        print(f"torchrun started {world} worker(s): {', '.join(ignored)} ignored (torchrun's "
              "--nnodes/--nproc-per-node decide).", file=sys.stderr)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    args.restarted = restarts  # setup_run decides whether the run resumes by itself
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=args.dist_timeout)
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    # torchrun's agent keeps one store for all restarts (torch 2.14 assumes a new one per
    # restart and adds no prefix): without one, a restarted worker can read the address its
    # peer had before the restart and wait on it (seen here in 3 of 5 restarts of a bare gloo
    # script). The restart count and world size name the attempt, as torch's own prefix once did.
    store = dist.PrefixStore(f"d2persist/attempt_{restarts}/world_{world}", store)
    dist.init_process_group(backend="nccl" if has_gpu else "gloo", store=store, rank=rank,
                            world_size=world, timeout=timeout)
    try:
        comm.create_local_process_group(local_world)
        comm.synchronize()
        return main(args)
    finally:
        _leave_process_group()


def launch_main(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """
    Run a tool's ``main(args)`` under the launcher that started it: as one of torchrun's
    workers (see :func:`launched_by_torchrun`), else through ``detectron2.engine.launch`` with
    ``--num-gpus/--num-machines/--machine-rank/--dist-url``. A worker's exit code (2 for a known
    error) becomes the tool's.
    """
    from datetime import timedelta

    if launched_by_torchrun():
        return _torchrun_worker(main, args)

    import torch.multiprocessing as mp
    from detectron2.engine import launch

    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=timedelta(seconds=args.dist_timeout),
        )
    except mp.ProcessExitedException as e:  # a worker exited with a code: pass it on
        code = e.exit_code or 1
        sys.exit(128 - code if code < 0 else code)  # killed by signal N: 128 + N, as a shell
