"""``slotlab <command>``: each command parses its arguments and calls one library function.

A user mistake (:class:`~slotlab.errors.UserError`, or bad arguments) prints one line ``error: ...`` on stderr and
exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from slotlab.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _count(text: str) -> int:
    """An argparse type: an integer >= 0 (0 usually means "all" or "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or positive, got {value}")
    return value


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more, got 0")
    return value


def _checkpoint(text: str) -> str:
    """An argparse type: a checkpoint name, ``last``, ``best`` or a snapshot ``step-<N>`` (``train.keep_every``)."""
    from slotlab.runs import KEPT_NAME

    if text in ("last", "best") or KEPT_NAME.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"expected last, best or step-<N>, got {text!r}")


def _slot_list(text: str) -> list[int]:
    """An argparse type: ``"1,3"`` -> ``[1, 3]``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of slot indices") from None


def _pixel_list(text: str) -> list[tuple[int, int]]:
    """An argparse type: ``"10,12;30,4"`` -> ``[(10, 12), (30, 4)]`` as (y, x)."""
    pixels = []
    for item in (part for part in text.split(";") if part.strip()):
        try:
            y, x = (int(value) for value in item.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"item {item!r} is not of the form y,x") from None
        pixels.append((y, x))
    return pixels


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, plus ``data.skip_bad=true`` for ``--skip-bad``."""
    return (args.set or []) + (["data.skip_bad=true"] if getattr(args, "skip_bad", False) else [])


def _resolve_config(args: argparse.Namespace):
    from slotlab.config import apply_overrides, get_preset

    return apply_overrides(get_preset(args.preset), _overrides(args))


# ------------------------------------------------------------------------------------------------------ handlers
def cmd_train(args: argparse.Namespace) -> None:
    from slotlab.train.loop import branch, prepare_branch, resume, train

    if args.source and (args.resume or args.preset):
        raise UserError("--from RUN_DIR takes no --preset or --resume (the new run starts from that run's config)")
    if args.checkpoint != "last" and not args.source:
        raise UserError("--checkpoint only goes with --from RUN_DIR")
    if args.source and not args.out:
        raise UserError("--from RUN_DIR needs --out NEW_RUN_DIR (the branch is a new run)")
    if args.devices != 1:  # torchrun starts this command (without --devices) in each of the processes
        from slotlab.train.distributed import launch_train

        batch_size = 0
        if args.source:  # checked once here, not in each of the G processes
            config, _, _ = prepare_branch(Path(args.source), Path(args.out), _overrides(args), args.checkpoint)
            batch_size = config.train.batch_size
        launch_train(args.devices, args.preset, args.out, args.resume, _overrides(args), args.source, args.checkpoint,
                     batch_size)
        return
    if args.resume:
        if args.preset or args.out:
            raise UserError("--resume RUN_DIR takes no --preset or --out (the run directory has its config)")
        resume(Path(args.resume), _overrides(args))
        return
    if args.source:
        branch(Path(args.source), Path(args.out), _overrides(args), args.checkpoint)
        return
    if not args.preset or not args.out:
        raise UserError("train needs --preset P and --out RUN_DIR (or --resume RUN_DIR, or --from RUN_DIR --out NEW)")
    train(_resolve_config(args), Path(args.out))


def cmd_eval(args: argparse.Namespace) -> None:
    from slotlab.evaluate import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), args.split, args.checkpoint, args.limit, args.batch_size,
                           args.device, seed=args.seed, iters=args.iters, draws=args.draws, restarts=args.restarts,
                           posterior={"on": True, "off": False, None: None}[args.posterior])
    print(json.dumps(metrics, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from slotlab.api import export_run

    print(export_run(Path(args.run_dir), Path(args.out), args.checkpoint))


def cmd_report(args: argparse.Namespace) -> None:
    from slotlab.report.html import write_report

    print(write_report(Path(args.run_dir)))


def cmd_presets(args: argparse.Namespace) -> None:
    from slotlab.config import PRESETS, list_presets

    for name in list_presets():
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()
        print(f"{name:24s} {doc[0] if doc else ''}")


def cmd_config(args: argparse.Namespace) -> None:
    from slotlab.config import config_to_dict

    print(json.dumps(config_to_dict(_resolve_config(args)), indent=2))


def cmd_data_render(args: argparse.Namespace) -> None:
    from slotlab.data.render import render_dataset

    render_dataset(variant=args.variant, num_scenes=args.n, out_dir=Path(args.out), seed=args.seed,
                   workers=args.workers, size=args.size, shapes=args.shapes)


def cmd_data_cache(args: argparse.Namespace) -> None:
    from slotlab.data.cache import cache_dataset

    print(cache_dataset(_resolve_config(args).data, splits=args.splits))


def cmd_library(args: argparse.Namespace) -> None:
    from slotlab.generate.slot_library import build_library

    print(build_library(Path(args.run_dir), split=args.split, batch_size=args.batch_size, device=args.device,
                        limit=args.limit))


def cmd_compose(args: argparse.Namespace) -> None:
    from slotlab.generate.compose import compose

    result = compose(Path(args.run_dir), num_images=args.n, clusters=args.clusters, seed=args.seed,
                     device=args.device, library_limit=args.library_limit)
    print(json.dumps(result, indent=2))


def cmd_mix(args: argparse.Namespace) -> None:
    from slotlab.generate.mix import mix

    if bool(args.take_from_b) == bool(args.pixels):
        raise UserError("mix: give either --take-from-b SLOTS or --pixels Y,X (one of them)")
    print(mix(Path(args.run_dir), args.a, args.b, take_from_b=args.take_from_b, pixels=args.pixels,
              split=args.split, device=args.device))


def cmd_fid(args: argparse.Namespace) -> None:
    from slotlab.metrics.fid import fid_between_folders

    result = fid_between_folders(Path(args.dir_a), Path(args.dir_b), kid=not args.no_kid, device=args.device)
    for name, value in result.items():
        if name != "fid":
            print(f"{name.upper()} {value}")
    print(f"FID {result['fid']}")


def cmd_compare(args: argparse.Namespace) -> None:
    from slotlab.report.compare import compare_runs

    print(compare_runs([Path(p) for p in args.run_dirs], out=Path(args.out) if args.out else None))


def cmd_edit(args: argparse.Namespace) -> None:
    from slotlab.generate.edit import edit

    print(edit(Path(args.run_dir), image=args.image, slot=args.slot, variable=args.variable, code=args.code,
               split=args.split, device=args.device))


# ------------------------------------------------------------------------------------------------------ parser
def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--preset", required=required, help="named preset (see `slotlab presets`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. train.steps=100")


def _add_skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad data files (listed in RUN_DIR/skipped_files.txt) instead of stopping; "
                        "= --set data.skip_bad=true")


def build_parser() -> argparse.ArgumentParser:
    from slotlab import __version__

    parser = _Parser(prog="slotlab", description="Object-centric learning with Slot Attention.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"slotlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}  # every --help shows the defaults

    def add(name: str, handler: Callable, help_: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=help_, **defaults)
        p.set_defaults(handler=handler)
        return p

    p = add("train", cmd_train, "train a model: --preset P --out RUN_DIR, or --resume RUN_DIR, or --from RUN_DIR "
                                "--out NEW_RUN_DIR")
    p.add_argument("--preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", help="new run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--from", dest="source", metavar="RUN_DIR",
                   help="branch: a new run (--out) that goes on from RUN_DIR's checkpoint with any --set changed")
    p.add_argument("--checkpoint", default="last", type=_checkpoint,
                   help="the checkpoint --from starts at: last, best or a kept step-<N> (train.keep_every)")
    p.add_argument("--devices", type=int, default=1, metavar="G",
                   help="train data-parallel in G processes (one per GPU; gloo on CPU) launched with torchrun; "
                        "1 = in this process, no torchrun")
    _add_skip_bad(p)

    p = add("eval", cmd_eval, "score a run on a split; writes RUN_DIR/eval/")
    p.add_argument("run_dir")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split of the run\'s dataset")
    p.add_argument("--checkpoint", default="best", type=_checkpoint,
                   help="best = lowest validation loss (falls back to last), last, or a kept step-<N>")
    p.add_argument("--limit", type=_count, default=0, help="score only the first N images (0 = all)")
    p.add_argument("--batch-size", type=_count, default=0, help="images per forward pass (0 = the training batch)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:N")
    p.add_argument("--iters", type=_count, default=0, metavar="T",
                   help="grouping iterations at test time (0 = the run's model.test_iters, else as trained); "
                        "results go to eval/<split>-<ckpt>-T<T>")
    p.add_argument("--restarts", type=_count, default=0, metavar="R",
                   help="R draws of the Gaussian initial slots per image, each image keeping the one whose decoder "
                        "masks agree best with its attention masks (no labels; 0 = the run's model.test_restarts); "
                        "results go to eval/<split>-<ckpt>-R<R>")
    p.add_argument("--posterior", choices=["on", "off"], default=None,
                   help="score each pixel's posterior over the slots (on) or the masks that compose the image (off) "
                        "instead of the run's model.mask_posterior; results go to eval/...-posterior or -mixture")
    p.add_argument("--seed", type=_count, default=0, metavar="S",
                   help="seed of the initial slots' noise (of the first draw); other than 0: eval/...-seed<S>")
    p.add_argument("--draws", type=_positive, default=1, metavar="N",
                   help="score N draws of the initial slots (seeds S, S+1, ...) and report each score's mean, "
                        "standard deviation and per-draw values; results go to eval/...-draws<N>")

    p = add("export", cmd_export, "write a shareable model folder: config.json, model.safetensors, README.md")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="new folder (Hugging Face style; slotlab.load and every command "
                                                "taking a run directory accept it)")
    p.add_argument("--checkpoint", default="best", type=_checkpoint,
                   help="best = lowest validation loss, last, or a kept step-<N> (default: %(default)s)")

    p = add("report", cmd_report, "write RUN_DIR/report.html and report.md")
    p.add_argument("run_dir")

    add("presets", cmd_presets, "list the named presets")
    p = add("config", cmd_config, "print the resolved config of a preset with overrides")
    _add_config_args(p)

    data = add("data", None, "make or prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = add("render", cmd_data_render, "render CLEVRTex-like 3D scenes in the CLEVRTex layout", data_sub)
    p.add_argument("--variant", required=True, choices=["clevr", "tex"])
    p.add_argument("--n", type=_count, required=True, help="number of scenes")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.add_argument("--size", default="240x320", help="HxW of the rendered images")
    p.add_argument("--shapes", default="", help="comma-separated shapes (default: sphere,cube,cylinder)")
    p = add("cache", cmd_data_cache, "write a dataset's prepared splits as memory-mapped uint8 arrays", data_sub)
    _add_config_args(p)
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    _add_skip_bad(p)

    p = add("library", cmd_library, "encode a split into a slot library (RUN_DIR/library/SPLIT: K x D floats per "
                                    "image; resumable)")
    p.add_argument("run_dir")
    p.add_argument("--limit", type=_count, default=0, help="encode only the first N images (0 = the whole split)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split of the run\'s dataset")
    p.add_argument("--batch-size", type=_count, default=0, help="images per forward pass (0 = the training batch)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:N")

    p = add("compose", cmd_compose, "K-means over the slot library, sample one slot per cluster, decode, FID")
    p.add_argument("run_dir")
    p.add_argument("--n", type=_count, default=0, help="number of scenes (0 = number of val images)")
    p.add_argument("--clusters", type=_count, default=0, help="K-means clusters (0 = number of slots)")
    p.add_argument("--library-limit", type=_count, default=0,
                   help="build the slot library from the first N train images (0 = all; encoding the whole train "
                        "split takes minutes on a CPU, once)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:N")

    p = add("mix", cmd_mix, "swap slots between two images and decode")
    p.add_argument("run_dir")
    p.add_argument("--a", type=int, required=True, help="index of image A in the split")
    p.add_argument("--b", type=int, required=True, help="index of image B in the split")
    p.add_argument("--take-from-b", type=_slot_list, default=[], help="slot indices of B to put into A, e.g. 1,3")
    p.add_argument("--pixels", type=_pixel_list, default=[],
                   help="or: y,x pixels of B whose objects move, e.g. 10,12;30,4")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split of the run\'s dataset")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:N")

    p = add("fid", cmd_fid, "clean-fid (and KID) between two image folders; last line: FID <value>")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:N")

    p = add("compare", cmd_compare, "a table of metrics across runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="", help="also write the table here (.md or .csv)")

    p = add("edit", cmd_edit, "change one discrete latent variable of one slot (VQ-SA runs) and re-decode")
    p.add_argument("run_dir")
    p.add_argument("--image", type=int, required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--variable", type=int, required=True)
    p.add_argument("--code", type=int, required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split of the run\'s dataset")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:N")
    return parser


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: the path(s) and the system's reason (no space left, read-only, ...)."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{paths}: {reason}" if paths else reason


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # bad arguments (exit 2, one line already printed) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk, a path through a file, no permission: the user's to fix
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
