"""What the command-line tools share: run setup, and known errors as one line + exit code 2."""

import functools
import logging
import os
import sys

__all__ = [
    "EXIT_BAD_INPUT",
    "exit_on_known_errors",
    "setup_run",
    "add_launch_arguments",
    "launch_main",
]

#: Exit code for bad input or bad artifacts.
EXIT_BAD_INPUT = 2


def exit_on_known_errors(prog):
    """
    Decorate a tool's ``main``: a :class:`D2PersistError` is printed as one line on stderr and
    exits with code 2; Ctrl-C exits with 130 without a traceback.
    """

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from .errors import D2PersistError

            try:
                return fn(*args, **kwargs)
            except D2PersistError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)

        return wrapper

    return decorator


def setup_run(cfg, args):
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

    from .runconfig import run_config

    run = run_config(cfg)
    output_dir = run.output_dir
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


def add_launch_arguments(parser):
    """
    Add ``--dist-timeout`` to a ``default_argument_parser()``: seconds a process waits in a
    collective (and at start-up for the others) before the run fails, as ``launch(timeout=)``.
    """
    parser.add_argument(
        "--dist-timeout", type=float, default=30 * 60, metavar="SECONDS",
        help="fail a multi-process run whose processes wait on each other this long "
        "(detectron2's default: 1800)",
    )
    return parser


def launch_main(main, args):
    """
    ``detectron2.engine.launch(main, ...)`` with the parsed arguments; a worker's exit code
    (2 for a known error) becomes the tool's.
    """
    from datetime import timedelta

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
        sys.exit(e.exit_code or 1)
