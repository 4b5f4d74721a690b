"""The ``caid-hf`` command: ``caid-hf pretrain|finetune|evaluate-features|phantoms|prepare-data|export|push|
convert-original …``."""

from __future__ import annotations

import sys

from .console import ArgumentParser, format_duration, quiet_loading, run_command


def _phantoms(argv: list[str], prog: str) -> None:
    parser = ArgumentParser(
        prog=prog, description="Write synthetic chest phantoms as 8-bit PNGs "
                               "(--version cxr14: with a ChestX-ray14-layout label file)."
    )
    parser.add_argument("--out", required=True, help="Folder to write phantom_00000.png … into.")
    parser.add_argument("--num", type=int, default=100, help="Number of phantoms.")
    parser.add_argument("--size", type=int, default=256, help="Side in pixels.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", choices=("v1", "cxr14"), default="v1",
                        help="v1: the first phantoms (one finding, nodules); cxr14: "
                             "ChestX-ray14-like phantoms with eight findings, written with "
                             "Data_Entry.csv (docs/phantoms.md).")
    parser.add_argument("--no-nodules", action="store_true", help="Draw no nodules (v1).")
    parser.add_argument("--masks", action="store_true",
                        help="Also write masks: v1 masks/NAME.png (nodules); cxr14 "
                             "masks/FINDING/NAME.png for its six localised findings.")
    parser.add_argument("--sheet", default=None, metavar="PNG",
                        help="cxr14: draw the picture sheet (labelled phantoms, each finding "
                             "alone at 64 and 256 px) to this file instead of writing a set.")
    a = parser.parse_args(argv)
    if a.version == "cxr14":
        if a.no_nodules:
            parser.error("--no-nodules applies to --version v1 only")
        if a.sheet:
            from .data.phantom_sheet import draw_phantom_sheet

            draw_phantom_sheet(a.sheet, seed=a.seed)
            print(f"wrote the phantom sheet to {a.sheet}")
            return
        from .data.chest_phantoms import write_chest_phantoms

        paths = write_chest_phantoms(a.out, a.num, size=a.size, seed=a.seed, masks=a.masks)
        print(f"wrote {len(paths)} phantoms and {a.out}/Data_Entry.csv to {a.out}")
        return
    if a.sheet:
        parser.error("--sheet needs --version cxr14")
    from .data.phantoms import write_phantoms

    paths = write_phantoms(a.out, a.num, size=a.size, seed=a.seed, nodules=not a.no_nodules,
                           write_masks=a.masks)
    print(f"wrote {len(paths)} phantoms to {a.out}")


def _export(argv: list[str], prog: str) -> None:
    from .modeling_caid import CAiDModel

    parser = ArgumentParser(
        prog=prog,
        description="Write a CAiD backbone as a segmentation_models_pytorch folder "
                    "(loads with segmentation_models_pytorch.from_pretrained(folder)).",
    )
    parser.add_argument("model", help="CAiD backbone folder or Hub id (e.g. outputs/demo/best).")
    parser.add_argument("--out", required=True, help="Folder to write the smp Unet into.")
    a = parser.parse_args(argv)
    CAiDModel.from_pretrained(a.model).export_smp(a.out)
    print(f"wrote segmentation_models_pytorch Unet to {a.out}")


def _push(argv: list[str], prog: str) -> None:
    from .publishing import push_folder

    parser = ArgumentParser(
        prog=prog,
        description="Upload a saved CAiD folder to a Hub model repo. The token comes from HF_TOKEN "
                    "or `hf auth login` and is never printed.",
    )
    parser.add_argument("folder", help="Folder with config.json and model.safetensors.")
    parser.add_argument("repo_id", help="'namespace/name' of the model repo.")
    parser.add_argument("--revision", default=None, help="Branch to push to (default main).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print repo, revision and every file with its size; upload nothing "
                             "(the card's snippets still get the repo id).")
    parser.add_argument("--license", default=None,
                        help="Licence id for the card (e.g. apache-2.0, cc-by-nc-4.0, or other).")
    parser.add_argument("--license-name", default=None, help="Short name of an 'other' licence.")
    parser.add_argument("--license-link", default=None, help="URL of an 'other' licence's text.")
    parser.add_argument("--dataset", action="append", default=None,
                        help="Hub dataset id the weights were trained on (repeatable).")
    parser.add_argument("--with-exports", action="store_true",
                        help="Also upload smp/ (segmentation_models_pytorch) and, with timm "
                             "installed, timm/ export folders, each with a short card.")
    a = parser.parse_args(argv)
    push_folder(a.folder, a.repo_id, revision=a.revision, private=a.private, dry_run=a.dry_run,
                license=a.license, license_name=a.license_name, license_link=a.license_link,
                datasets=a.dataset, with_exports=a.with_exports)


def _convert_original(argv: list[str], prog: str) -> None:
    from .convert_original import convert_original_checkpoint
    from .model_settings import DEFAULT_IMAGE_SIZE

    parser = ArgumentParser(
        prog=prog,
        description="Turn the original CAiD repository's best_checkpoint.pth / checkpoint.pth "
                    "(U-Net state dict) or current_checkpoint.pth (MoCo state with queue) into "
                    "caid-hf folders. Files are read with torch.load(weights_only=True).",
    )
    parser.add_argument("file", help="The original .pth file.")
    parser.add_argument("--out", required=True, help="Folder to write.")
    parser.add_argument("--encoder_name", default=None,
                        help="Encoder of the checkpoint (default: inferred from the weights).")
    parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help="Training view size.")
    parser.add_argument("--temperature", "--moco-t", "--moco_t", type=float, default=None,
                        help="The original run's --moco-t (default: the checkpoint's 'args' "
                             "when it has them, else the original's 0.2).")
    parser.add_argument("--momentum", "--moco-m", "--moco_m", type=float, default=None,
                        help="The original run's --moco-m (default: the checkpoint's 'args' "
                             "when it has them, else the original's 0.999).")
    a = parser.parse_args(argv)
    overrides = {k: v for k, v in (("contrastive_temperature", a.temperature),
                                   ("momentum", a.momentum)) if v is not None}
    out = convert_original_checkpoint(a.file, a.out, encoder_name=a.encoder_name,
                                      image_size=a.image_size, **overrides)
    print(f"wrote {out}")


def _prepare_data(argv: list[str], prog: str) -> None:
    import json
    import time
    from pathlib import Path

    from .data.cache import CACHE_METADATA_FILE, default_cache_size, prepare_cache
    from .data.source_spec import HFOptions, source_from_spec

    parser = ArgumentParser(
        prog=prog,
        description="Decode every image of a source once into a memory-mapped Arrow cache "
                    "(a datasets folder of raw grey pixels) that training reads without "
                    "decoding. Resumable: rerun the same command after an interruption. "
                    "Unreadable images are skipped and listed in OUT/caid_cache.json.",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="'phantoms', a split-list file, a folder of PNG/JPEG/DICOM files, "
                             "a datasets save_to_disk folder, a parquet/arrow file or glob, or "
                             "'hf:NAME' (datasets.load_dataset).")
    parser.add_argument("--out", required=True, help="Folder of the cache to write.")
    parser.add_argument(
        "--size", type=int, default=None,
        help=f"Short side of the stored images; smaller images are kept as they are "
             f"(default {default_cache_size()}: the smallest multiple of 32 whose smallest "
             "RandomResizedCrop, 20%% of the area at aspect 3/4, still spans 224 pixels "
             "across, so every 224-px view is a downscale of the cache).")
    parser.add_argument("--num-proc", type=int, default=1, help="Processes decoding in parallel.")
    parser.add_argument("--images-root", default=None,
                        help="Folder the split list's paths are relative to "
                             "(default: the list's folder).")
    parser.add_argument("--chunk-size", type=int, default=256,
                        help="Images per resumable chunk.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a finished cache at --out.")
    parser.add_argument("--shards", type=int, default=1,
                        help="Files to write the rows to, in order: the unit that the "
                             "processes and DataLoader workers of a streaming run share out "
                             "(e.g. a multiple of all the workers of a cluster).")
    parser.add_argument("--shard-format", choices=["arrow", "parquet"], default="arrow",
                        help="arrow: a datasets save_to_disk folder, read with random access "
                             "or streamed; parquet: data/train-*.parquet with a dataset card, "
                             "streamed locally or uploaded to the Hub and streamed as hf:REPO.")
    parser.add_argument("--split", default="train", help="Split of a Hugging Face dataset.")
    parser.add_argument("--config-name", default=None, help="Config of an 'hf:NAME' dataset.")
    parser.add_argument("--image-column", default=None,
                        help="Image column of a Hugging Face dataset (default: the first).")
    parser.add_argument("--id-column", default=None,
                        help="Column naming each image of a Hugging Face dataset.")
    parser.add_argument("--bits-stored", type=int, default=None,
                        help="Bit depth of 16-bit PNG and DICOM pixels (e.g. 12) for the whole "
                             "source (default: each file's header, DICOM BitsStored or PNG "
                             "sBIT, else a per-image guess).")
    a = parser.parse_args(argv)  # ranges checked too (--bits-stored, --shards, --num-proc ...)
    options = HFOptions(split=a.split, config_name=a.config_name, image_column=a.image_column,
                        id_column=a.id_column)
    source = source_from_spec(a.source, images_root=a.images_root, hf_options=options,
                              bits_stored=a.bits_stored)
    # a path is recorded absolute, so a resumed run from another folder still matches
    description = str(Path(a.source).resolve()) if Path(a.source).exists() else a.source
    if a.images_root is not None:
        description += f" (images root {Path(a.images_root).resolve()})"
    if a.bits_stored is not None:
        description += f" ({a.bits_stored} bits stored)"
    started = time.perf_counter()
    print(f"caid-hf prepare-data: decoding {a.source} into {a.out} with {a.num_proc} "
          f"process(es)")
    out = prepare_cache(source, a.out, size=a.size, num_proc=a.num_proc,
                        chunk_size=a.chunk_size, source_description=description,
                        overwrite=a.overwrite, num_shards=a.shards, shard_format=a.shard_format)
    metadata = json.loads((out / CACHE_METADATA_FILE).read_text(encoding="utf-8"))
    seconds = time.perf_counter() - started
    shards = (f" as {a.shards} {a.shard_format} shards" if a.shards > 1 or
              a.shard_format != "arrow" else "")
    print(f"wrote {metadata['num_images']} images ({len(metadata['bad_files'])} bad files) "
          f"with short side {metadata['size']}{shards} to {out} "
          f"in {seconds:.1f} s ({metadata['num_images'] / max(seconds, 1e-9):.1f} images/s)")


def _finetune(argv: list[str], prog: str) -> None:
    from .finetuning.arguments import parse_finetuning_args  # without torch

    arguments = parse_finetuning_args(argv, prog=prog)  # every mistake before torch loads
    from .finetuning.finetune import finetune

    finetune(*arguments)


def _evaluate_features_parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Embed a labelled set with a frozen backbone (pooler_output, or every "
                    "stage with --embedding stages), score k-NN "
                    "and linear-probe (logistic regression) classifiers, and save a t-SNE map "
                    "of the embeddings coloured by label. Writes OUT/scores.json, "
                    "OUT/embeddings.npz and OUT/tsne.png.",
    )
    parser.add_argument("model", help="CAiD folder or Hub id (e.g. outputs/demo/best), or "
                                      "'random' for a randomly initialised backbone (the floor).")
    parser.add_argument("--source", default="phantoms",
                        help="Labelled set: 'phantoms' (label 'nodule'), a CSV file, a "
                             "ChestX-ray14 split list with labels, or a Hugging Face dataset.")
    parser.add_argument("--test-source", default=None,
                        help="Held-out set the probes are scored on (default: k-fold "
                             "cross-validation on --source).")
    parser.add_argument("--out", required=True, help="Folder to write into.")
    parser.add_argument("--images-root", default=None, help="Folder of the list's/CSV's paths.")
    parser.add_argument("--image-column", default=None, help="CSV / dataset image column.")
    parser.add_argument("--label-columns", nargs="+", default=None,
                        help="CSV / dataset label column(s).")
    parser.add_argument("--label-names", nargs="+", default=None, help="Names of the labels.")
    parser.add_argument("--hf-split", default="train", help="Split of a Hugging Face --source.")
    parser.add_argument("--hf-test-split", default="test",
                        help="Split of a Hugging Face --test-source.")
    parser.add_argument("--image-size", type=int, default=None,
                        help="Input side in px (default: the model's image_size).")
    parser.add_argument("--encoder-name", default="resnet50", help="Encoder of 'random'.")
    parser.add_argument("--num-phantoms", type=int, default=400, help="Phantoms of --source.")
    parser.add_argument("--num-test-phantoms", type=int, default=400,
                        help="Phantoms of a 'phantoms' --test-source.")
    parser.add_argument("--phantom-size", type=int, default=128, help="Side of the phantoms.")
    parser.add_argument("--phantom-seed", type=int, default=1000,
                        help="Seed of the phantoms (a phantom test set uses seed + 2).")
    parser.add_argument("--k", type=int, default=20, help="Neighbours of the k-NN classifier.")
    parser.add_argument("--folds", type=int, default=5,
                        help="Cross-validation folds, grouped by patient when the images have "
                             "patient ids (--patient-id-from).")
    parser.add_argument("--patient-id-from", default="auto",
                        help="Patient of each image, as fine-tuning reads it: 'auto' (CheXpert "
                             "patientNNNNN, MIMIC subject_id, PadChest PatientID, ChestX-ray14 "
                             "file names), 'filename_prefix', 'column:NAME', 'regex:PATTERN' "
                             "or 'none' (image-level folds).")
    parser.add_argument("--color-label", default=None,
                        help="Colour the map by this label (present / absent).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cuda if present).")
    parser.add_argument("--batch-norm-statistics", choices=["model", "data"], default=None,
                        help="'model': the backbone's saved BatchNorm statistics; 'data': "
                             "re-estimated on --source's images first (no labels used). "
                             "Default: 'model', and 'data' for 'random', which has never seen "
                             "an image.")
    from .finetuning.label_formats import BLANK_POLICIES, LABEL_FORMATS, UNCERTAIN_POLICIES

    parser.add_argument("--label-format", choices=LABEL_FORMATS, default="auto",
                        help="Layout of a label CSV (default: from its header; docs/data.md).")
    parser.add_argument("--uncertain-labels", choices=UNCERTAIN_POLICIES, default="ignore",
                        help="Uncertain (-1) labels: left out of the probes' fit and score "
                             "(ignore), or counted as 1 or 0.")
    parser.add_argument("--blank-labels", choices=BLANK_POLICIES, default="zeros",
                        help="Blank (not mentioned) labels: negative, or left out.")
    parser.add_argument("--views", nargs="+", default=None,
                        help="Keep only these views: frontal, lateral or codes (PA, AP ...); "
                             "CheXpert's Frontal/Lateral column decides frontal vs lateral.")
    parser.add_argument("--accept-unknown-findings", action="store_true",
                        help="Read finding names outside the data set's vocabulary as findings "
                             "of their own (default: refuse the file, naming their lines).")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="Missing or undecodable images are left out and listed in "
                             "OUT/bad_files.tsv; more than this fraction stops the evaluation.")
    parser.add_argument("--bits-stored", type=int, default=None,
                        help="Bit depth of 16-bit PNG / DICOM pixels (default: the header's, "
                             "else guessed per image).")
    parser.add_argument("--embedding", choices=["pooled", "stages"], default="pooled",
                        help="'pooled': the last stage's average (pooler_output, what a "
                             "classifier head sees); 'stages': every encoder stage's average "
                             "side by side, so low and mid-level features count too.")
    return parser


def _evaluate_features(argv: list[str], prog: str) -> None:
    from .finetuning.data import LabelledSourceOptions, labelled_source_from_spec
    from .finetuning.features import evaluate_features
    from .model_settings import DEFAULT_IMAGE_SIZE

    a = _evaluate_features_parser(prog).parse_args(argv)

    import time

    import torch

    from .configuration_caid import CAiDConfig
    from .data.source_spec import HFOptions
    from .modeling_caid import CAiDModel

    if a.model == "random":
        torch.manual_seed(a.seed)
        backbone = CAiDModel(CAiDConfig(encoder_name=a.encoder_name,
                                        image_size=a.image_size or DEFAULT_IMAGE_SIZE),
                            add_decoder=False)
        name = f"randomly initialised {a.encoder_name}"
    else:
        with quiet_loading():
            backbone = CAiDModel.from_pretrained(a.model)
        name = a.model
    image_size = a.image_size or backbone.config.image_size
    options = LabelledSourceOptions(
        images_root=a.images_root, image_column=a.image_column, label_columns=a.label_columns,
        label_names=a.label_names, hf=HFOptions(split=a.hf_split),
        num_phantoms=a.num_phantoms, phantom_size=a.phantom_size, phantom_seed=a.phantom_seed,
        label_format=a.label_format, uncertain_labels=a.uncertain_labels,
        blank_labels=a.blank_labels, views=a.views, bits_stored=a.bits_stored,
        patient_id_from=a.patient_id_from, accept_unknown_findings=a.accept_unknown_findings)
    source = labelled_source_from_spec(a.source, options)
    test = None
    if a.test_source is not None:
        options.num_phantoms = a.num_test_phantoms
        test = labelled_source_from_spec(a.test_source, options, split=a.hf_test_split,
                                         phantom_seed_offset=2)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    print(f"caid-hf evaluate-features: {name}, {a.embedding} embedding at {image_size} px on "
          f"{device}; {len(source)} images of {a.source}"
          + (f", scored on {len(test)} of {a.test_source}" if test is not None
             else f", {a.folds}-fold cross-validation") + f" -> {a.out}")
    result = evaluate_features(backbone, source, a.out, image_size, test_source=test,
                               model_name=name, k=a.k, folds=a.folds, seed=a.seed,
                               batch_size=a.batch_size, color_label=a.color_label,
                               device=device, batch_norm_statistics=a.batch_norm_statistics
                               or ("data" if a.model == "random" else "model"),
                               embedding=a.embedding, patient_id_from=a.patient_id_from,
                               max_bad_fraction=a.max_bad_fraction)
    for method, values in result.scores.items():
        print(f"{method:>12}: mean AUC {values['mean_auc']:.4f}, "
              f"mean accuracy {values['mean_accuracy']:.4f}")
    print(f"done in {format_duration(time.perf_counter() - started)}: wrote {result.json}, "
          f"{result.png}")


def _evaluate_transfer(argv: list[str], prog: str) -> None:
    from .finetuning.transfer import main as transfer_main

    transfer_main(argv, prog=prog)


def _pretrain(argv: list[str], prog: str) -> None:
    from .training.arguments import parse_pretraining_args  # standard library and PyYAML

    arguments = parse_pretraining_args(argv, prog=prog)  # every mistake before torch loads
    from .training.pretrain import pretrain

    pretrain(*arguments)


COMMANDS = {  # name: (what it does, handler of its arguments)
    "pretrain": ("CAiD pre-training (same flags as scripts/pretrain.py)", _pretrain),
    "finetune": ("fine-tune a classifier or U-Net (same flags as scripts/finetune.py)",
                 _finetune),
    "evaluate-features": ("k-NN / linear-probe scores and a t-SNE map of frozen embeddings",
                          _evaluate_features),
    "evaluate-transfer": ("label efficiency of backbones: probes and fine-tuning at several "
                          "label fractions", _evaluate_transfer),
    "phantoms": ("write synthetic chest phantoms to a folder", _phantoms),
    "prepare-data": ("decode a source once into a memory-mapped training cache", _prepare_data),
    "export": ("write a backbone as a segmentation_models_pytorch Unet folder", _export),
    "push": ("upload a saved folder to the Hugging Face Hub (--dry-run to list it)", _push),
    "convert-original": ("import the original repository's .pth checkpoints", _convert_original),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``caid-hf COMMAND [options]``; ``prog`` names the command in messages (the scripts
    pass their own name). A user's mistake exits with status 2 and one message (see
    :func:`~caid_hf.console.run_command`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items())
        print(f"usage: caid-hf COMMAND [options]\n\ncommands:\n{lines}\n\n"
              "`caid-hf COMMAND --help` lists a command's options")
        if argv and argv[0] not in ("-h", "--help"):
            import difflib

            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"caid-hf: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
            sys.exit(2)
        return
    _, handler = COMMANDS[argv[0]]
    prog = prog or f"caid-hf {argv[0]}"
    run_command(prog, lambda: handler(argv[1:], prog))


if __name__ == "__main__":
    main()
