"""The `btoks` command: train, embed, eval, export, data and main (the demo on the embedded data)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np


def _train(argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    # sys_argv: the `--config.KEY=VALUE` overrides are found in these arguments, not in the process's sys.argv
    # (they differ when `main` is called in-process).
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with ':arg'", flag_values=fv,
                                    lock_config=False, sys_argv=["btoks train"] + argv)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and TensorBoard logs go", flag_values=fv)
    try:
        fv(["btoks train"] + argv)
    except flags.Error as e:
        print(f"btoks train: {e}", file=sys.stderr)
        return 2
    if fv.config is None or not fv.workdir:
        print("btoks train: --config and --workdir are required", file=sys.stderr)
        return 2
    from btoks_jax.train import train

    train(fv.config, fv.workdir)
    return 0


def _read_embed_rows(path: str, *, allow_outside_root: bool = False, with_rows: bool = False):
    """JSONL rows {text, image?, video?, instruction?, id?} -> Items; media paths relative to the file (local or a
    `gs://` URL). A video is a folder of frames or a list of frame paths. Read with the MMEB readers' field readers
    and error format: a bad row raises ValueError `{file}: row {n}: field '{field}': ...`. Media paths must stay
    in the file's folder unless `allow_outside_root`; local images and frames are checked to open as images
    (`check_image`: not empty, an image, within Pillow's size limit, its structure intact) before any model is
    loaded. `with_rows`: return (items, the 1-based row number of each)."""
    from btoks_jax import fs
    from btoks_jax.data.media import RowError, image_path, iter_records, string_field, video_frames
    from btoks_jax.evaluate.mmeb import Item
    from btoks_jax.processing.image import MediaError, check_image

    if fs.is_remote(path):
        file, base = path, fs.dirname(path)
    else:
        file = Path(path)
        base = file.resolve().parent
    files = fs.FileIndex()
    items, numbers = [], []
    for n, row in iter_records(file):
        source = f"{path}: row {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(row).__name__}")
        unknown = set(row) - {"text", "image", "video", "instruction", "id"}
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}")
        try:
            text = string_field(row, "text", required=False)
            inst = string_field(row, "instruction", required=False)
            image = image_path(string_field(row, "image", required=False) or None, base, "image", files=files,
                               allow_outside_root=allow_outside_root)
            video = video_frames(row.get("video"), base, "video", files=files, allow_outside_root=allow_outside_root)
            for field, media, kind in (("image", (image,) if image else (), "image"), ("video", video or (), "frame")):
                for media_path in media:
                    if not fs.is_remote(media_path):
                        try:
                            check_image(media_path)
                        except MediaError as err:
                            raise RowError(field, f"cannot read {kind} {media_path}: {err.reason}") from None
        except RowError as err:
            raise err.at(source) from None
        if not text and not inst and image is None and video is None:
            raise ValueError(f"{source}: empty input (no text, instruction, image or video)")
        items.append(Item(text=text, image=image, video=video, instruction=inst))
        numbers.append(n)
    if not items:
        raise ValueError(f"{path}: no rows")
    return (items, numbers) if with_rows else items


def _embed(args) -> int:
    import btoks_jax
    from btoks_jax.evaluate.mmeb import ItemError

    items, numbers = _read_embed_rows(args.input, allow_outside_root=args.allow_outside_media, with_rows=True)
    model = btoks_jax.from_pretrained(args.model, step=args.step, num_btoks=args.num_btoks)
    if args.max_text_tokens is not None:
        model.max_text_tokens = args.max_text_tokens
    try:
        vectors = model.embed_items(items, pooling=args.pooling, batch_size=args.batch_size, progress=True)
    except ItemError as err:  # an image or frame that opened but does not decode: name its row
        raise err.at(f"{args.input}: row {numbers[err.index]}") from None
    from btoks_jax import fs

    if fs.is_remote(args.output):  # one PUT: readers see no object or the whole file
        import io

        buffer = io.BytesIO()
        np.save(buffer, vectors)
        fs.write_bytes_atomic(args.output, buffer.getvalue())
    else:
        tmp = args.output + ".tmp.npy"
        np.save(tmp, vectors)
        os.replace(tmp, args.output)
    print(f"wrote {vectors.shape[0]} embeddings of dimension {vectors.shape[1]} to {args.output}")
    return 0


def _eval(args) -> int:
    import btoks_jax
    from btoks_jax.evaluate import mmeb

    if bool(args.data) == bool(args.mmeb_v2):
        raise ValueError("give exactly one of --data (a folder of MMEB-V2-format rows) and --mmeb-v2 (the download "
                         "root of the published MMEB-V2 sets)")
    from btoks_jax import fs

    model = btoks_jax.from_pretrained(args.model, step=args.step, num_btoks=args.num_btoks,
                                      prompt_style=args.prompt_style or None)
    if args.max_text_tokens is not None:
        model.max_text_tokens = args.max_text_tokens
    fn = lambda items: model.embed_items(items, pooling=args.pooling, batch_size=args.batch_size,  # noqa: E731
                                         progress=False)
    datasets = args.datasets.split(",") if args.datasets else None
    # A model in a bucket keeps its scores there too (object storage needs no folder made).
    out = args.out or fs.join(args.model, f"eval_{args.pooling}")
    fs.makedirs(out)
    if args.mmeb_v2:
        from btoks_jax.evaluate.run import evaluate_mmeb_v2
        from btoks_jax.evaluate.store import EmbeddingStore

        name = args.model_name or fs.basename(args.model)
        cache = fs.as_path(args.cache_dir or fs.join(out, "cache"))
        store = None if args.no_cache else EmbeddingStore(fs.joinpath(cache, "embeddings"),
                                                          model.fingerprint(args.pooling))
        summary = evaluate_mmeb_v2(fn, args.mmeb_v2, out, style=model.prompt_style,
                                   media_dir=fs.joinpath(cache, "media"),
                                   store=store, datasets=datasets, batch_size=args.batch_size, max_rows=args.max_rows,
                                   overwrite=args.overwrite, model_name=name,
                                   allow_outside_media=args.allow_outside_media)
        print(mmeb.format_summary(summary))
        if summary["missing"]:
            print(f"{len(summary['missing'])} of the 78 data sets were not found under {args.mmeb_v2}:")
            for name, why in summary["missing"].items():
                print(f"  {name}: {why}")
        print(f"scores written to {out} (leaderboard JSON: {fs.join(out, name + '.json')})")
        return 0
    from btoks_jax.evaluate.run import evaluate_folder

    summary = evaluate_folder(fn, args.data, out_dir=out, datasets=datasets, batch_size=args.batch_size,
                              max_rows=args.max_rows, allow_outside_root=args.allow_outside_media)
    print(mmeb.format_summary(summary))
    for name, s in summary["datasets"].items():
        print(f"{name:<24} hit@1 {100 * s['hit@1']:5.1f}   ndcg_linear@5 {100 * s['ndcg_linear@5']:5.1f}")
    print(f"scores written to {out}")
    return 0


def _export(args) -> int:
    from btoks_jax.convert.checkpoint_export import export_from_checkpoint

    export_from_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                           max_shard_size=int(float(args.max_shard_size_gb) * 2**30), overwrite=args.overwrite)
    print(f"exported to {args.out}")
    return 0


def _data(args) -> int:
    from btoks_jax.data.emoji_dataset import build_emoji_dataset

    paths = build_emoji_dataset(args.out, seed=args.seed)
    print(f"emoji data set in {paths.root}")
    return 0


def _data_prepare(args) -> int:
    from btoks_jax.data.mmeb_prepare import prepare

    out = args.prepare_out or args.root
    report = prepare(args.root, out, prompt_style=args.prompt_style, only=args.only or None, caps=args.caps,
                     mmeb_split=args.mmeb_split, negatives=args.negatives, tfds=args.tfds,
                     overwrite=args.overwrite, progress=None if args.progress else False)
    entries = report["manifest"]["datasets"]
    for name in report["prepared"] + report["skipped"]:
        entry = entries[name]
        skipped = ", ".join(f"{n} {why}" for why, n in entry["rows_skipped"].items())
        state = "prepared" if name in report["prepared"] else "already prepared"
        print(f"{name}: {entry['rows_written']} rows ({state}{'; skipped ' + skipped if skipped else ''})")
    for name, why in report["missing"].items():
        print(f"{name}: missing ({why})")
    print(f"{len(report['prepared']) + len(report['skipped'])} data sets in {out} (prompt style "
          f"{args.prompt_style}); manifest: {os.path.join(out, 'manifest.json')}")
    root, where = os.path.realpath(args.root), os.path.realpath(out)
    if root != where and not root.startswith(where.rstrip(os.sep) + os.sep):
        # Media paths that leave the data folder are refused unless a media folder is named (DatasetSpec).
        print(f"the rows reach the downloaded media in {args.root} through '..': train with "
              f"configs/qwen2vl_2b.py:data_root={out},media_root={args.root} (DatasetSpec.media_roots)")
    return 0


def _main_job(args) -> int:
    from btoks_jax.main_job import run

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    run(args.workdir, steps=args.steps, only=args.only, ablation=args.ablation, seeds=seeds,
        pretrain_steps=args.pretrain_steps)
    return 0


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse reports anything else as a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btoks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (see: btoks train --help; flags are --config, --workdir, --config.x=y)")

    e = sub.add_parser("embed", help="embed a JSONL file of inputs into a .npy matrix (input order)")
    e.add_argument("--model", required=True, help="Hugging Face-format directory or btoks-jax workdir")
    e.add_argument("--input", required=True, help='JSONL rows {"text", "image", "video": [frames], "instruction"}')
    e.add_argument("--output", required=True, help="the .npy file to write")
    e.add_argument("--pooling", choices=("btoks", "last"), default="btoks")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--num-btoks", type=int, default=None)
    e.add_argument("--max-text-tokens", type=_at_least_one, default=None, metavar="N",
                   help="text tokens kept per input, the rest cut and counted in a warning; vision and special "
                        "tokens are never cut (default: Embedder.max_text_tokens, 8192)")
    e.add_argument("--allow-outside-media", action="store_true",
                   help="read media paths that leave the input file's folder (absolute paths, '..', symbolic "
                        "links pointing out), refused by default")
    e.set_defaults(fn=_embed)

    v = sub.add_parser("eval", help="evaluate on an MMEB-V2-format folder")
    v.add_argument("--model", required=True)
    v.add_argument("--data", default="", help="folder of MMEB-V2-format .jsonl/.parquet files")
    v.add_argument("--mmeb-v2", default="", metavar="ROOT",
                   help="download root of the published MMEB-V2 sets (ROOT/<owner>/<name>/, see the README): "
                        "scores every one of the 78 found and says which are missing")
    v.add_argument("--datasets", default="", help="comma-separated subset (default: every file / all 78)")
    v.add_argument("--prompt-style", choices=("", "btoks", "vlm2vec"), default="",
                   help="surface form of the prompts (default: the model's training style)")
    v.add_argument("--cache-dir", default="", help="--mmeb-v2: embedding store and extracted pages "
                                                   "(default: OUT/cache)")
    v.add_argument("--no-cache", action="store_true", help="--mmeb-v2: do not read or write the embedding store")
    v.add_argument("--overwrite", action="store_true", help="--mmeb-v2: recompute existing score files")
    v.add_argument("--model-name", default="", help="--mmeb-v2: name in the leaderboard JSON (default: the "
                                                    "model folder's name)")
    v.add_argument("--out", default="", help="where score files go, a folder or gs:// URL (default: "
                                             "MODEL/eval_POOLING, in the bucket for a gs:// model)")
    v.add_argument("--pooling", choices=("btoks", "last"), default="btoks")
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--max-rows", type=int, default=None)
    v.add_argument("--step", type=int, default=None)
    v.add_argument("--num-btoks", type=int, default=None)
    v.add_argument("--max-text-tokens", type=_at_least_one, default=None, metavar="N",
                   help="text tokens kept per item (default: Embedder.max_text_tokens, 8192)")
    v.add_argument("--allow-outside-media", action="store_true",
                   help="read media paths that leave the data folder (--data) or the MMEB-V2 root and cache "
                        "(--mmeb-v2): absolute paths, '..', symbolic links pointing out; refused by default")
    v.set_defaults(fn=_eval)

    x = sub.add_parser("export", help="export a checkpoint to Hugging Face PyTorch format")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--step", type=int, default=None)
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    x.add_argument("--max-shard-size-gb", default="5")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=_export)

    d = sub.add_parser("data", help="training data: `prepare` the published downloads, or build the embedded "
                                    "`emoji` set (the default)")
    d.add_argument("--out", default="")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_data)
    dsub = d.add_subparsers(dest="data_command")
    de = dsub.add_parser("emoji", help="build the embedded emoji data set")
    de.add_argument("--out", default="")
    de.add_argument("--seed", type=int, default=0)
    de.set_defaults(fn=_data)
    dp = dsub.add_parser("prepare", help="the published training downloads (ROOT/<owner>/<name>/) -> one "
                                         "<name>.jsonl a data set of the mixture (the downloads: "
                                         "btoks_jax/data/mmeb_prepare.py)")
    dp.add_argument("--root", required=True, help="download root: ROOT/<owner>/<name>/ as `hf download` leaves it")
    dp.add_argument("--out", dest="prepare_out", metavar="OUT", default="", help="where the files go (default: ROOT)")
    dp.add_argument("--prompt-style", choices=("btoks", "vlm2vec"), default="btoks",
                    help="surface form of the texts: the authors' (default) or VLM2Vec's")
    dp.add_argument("--only", default="", help="comma-separated data sets (default: all 25)")
    dp.add_argument("--caps", default="none", help="first-N source rows: none (default, the authors'), vlm2vec "
                                                   "(VLM2Vec's train_alltasks.yaml) and/or NAME=N, comma-separated")
    dp.add_argument("--mmeb-split", choices=("auto", "train", "original", "diverse_instruction"), default="auto",
                    help="MMEB-train parquet (default: train where present, as the authors, else original)")
    dp.add_argument("--negatives", choices=("authors", "all", "none"), default="authors",
                    help="MMEB-train negatives (default: kept where the authors keep them)")
    dp.add_argument("--tfds", action="store_true", help="also build the ArrayRecord copy of each set in OUT/tfds")
    dp.add_argument("--overwrite", action="store_true", help="prepare again the data sets already prepared")
    dp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="a progress bar per data set when stderr is a terminal")
    dp.set_defaults(fn=_data_prepare)

    m = sub.add_parser("main", help="the demo: pretrain a tiny Qwen2-VL on emoji captions, then train BToks and "
                                    "last-token embedders from it, compare")
    m.add_argument("--workdir", default="runs/main")
    m.add_argument("--steps", type=int, default=None, help="steps of every embedding arm (default 400)")
    m.add_argument("--pretrain-steps", type=int, default=None, help="steps of the generative first stage "
                   "(default 200)")
    m.add_argument("--ablation", action="store_true", help="all four arms of the paper's ablation (last-token, "
                   "BToks without GIC, GIC without the mask, the method), seeds 0 and 1")
    m.add_argument("--seeds", default="", help="comma-separated seeds of the arms (default: 0; 0,1 with "
                   "--ablation); must include 0")
    m.add_argument("--only", default="", help="run one stage: data, pretrain, train, eval, export, decode, report")
    m.set_defaults(fn=_main_job)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "train":
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "out", None) == "" and args.command == "data":
        from btoks_jax.train_config import default_data_dir

        args.out = default_data_dir()
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"btoks {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
