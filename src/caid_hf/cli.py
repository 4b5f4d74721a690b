"""The ``caid-hf`` command: ``caid-hf pretrain|phantoms|export …``."""

from __future__ import annotations

import argparse
import sys


def _phantoms(argv: list[str]) -> None:
    from .data.phantoms import write_phantoms

    parser = argparse.ArgumentParser(
        prog="caid-hf phantoms", description="Write synthetic chest phantoms as 8-bit PNGs."
    )
    parser.add_argument("--out", required=True, help="Folder to write phantom_00000.png … into.")
    parser.add_argument("--num", type=int, default=100, help="Number of phantoms.")
    parser.add_argument("--size", type=int, default=256, help="Side in pixels.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-nodules", action="store_true", help="Draw no nodules.")
    parser.add_argument("--masks", action="store_true", help="Also write nodule masks to masks/.")
    a = parser.parse_args(argv)
    paths = write_phantoms(a.out, a.num, size=a.size, seed=a.seed, nodules=not a.no_nodules,
                           write_masks=a.masks)
    print(f"wrote {len(paths)} phantoms to {a.out}")


def _export(argv: list[str]) -> None:
    from .modeling_caid import CAiDModel

    parser = argparse.ArgumentParser(
        prog="caid-hf export",
        description="Write a CAiD backbone as a segmentation_models_pytorch folder "
                    "(loads with segmentation_models_pytorch.from_pretrained(folder)).",
    )
    parser.add_argument("model", help="CAiD backbone folder or Hub id (e.g. outputs/demo/best).")
    parser.add_argument("--out", required=True, help="Folder to write the smp Unet into.")
    a = parser.parse_args(argv)
    CAiDModel.from_pretrained(a.model).export_smp(a.out)
    print(f"wrote segmentation_models_pytorch Unet to {a.out}")


COMMANDS = {
    "pretrain": "CAiD pre-training (same flags as scripts/pretrain.py)",
    "phantoms": "write synthetic chest phantoms to a folder",
    "export": "write a backbone as a segmentation_models_pytorch Unet folder",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
        print(f"usage: caid-hf COMMAND [options]\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"caid-hf: unknown command {argv[0]!r}")
        return
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        from .training.pretrain import main as pretrain_main

        pretrain_main(rest)
    elif command == "phantoms":
        _phantoms(rest)
    elif command == "export":
        _export(rest)


if __name__ == "__main__":
    main()
