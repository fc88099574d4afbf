"""``python -m medt_keras.datasets``: prepare a dataset, or export the HeLa frames as image files.

    python -m medt_keras.datasets prepare hela_nuclei/tiles64 [--data-dir D] [--manual-dir M]
    python -m medt_keras.datasets export-hela DIR [--split test]
    python -m medt_keras.datasets export-hela DIR --medt-folder    # all splits, 8-bit PNG, official layout
"""

import argparse
import sys

from medt_keras import datasets
from medt_keras.datasets import hela_nuclei


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m medt_keras.datasets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="prepare a builder (name or name/config) and print its splits")
    prepare.add_argument("name")
    prepare.add_argument("--data-dir")
    prepare.add_argument("--manual-dir")
    export = commands.add_parser("export-hela", help="whole HeLa frames: images/frameNN.tif and masks/frameNN.png")
    export.add_argument("directory")
    export.add_argument("--split", choices=sorted(hela_nuclei.SPLIT_FRAMES), default="test")
    export.add_argument("--medt-folder", action="store_true",
                        help="all splits as DIR/{train,validation,test}/{img,labelcol}/frameNN.png "
                             "(8-bit normalised frames, 0/255 masks), for medt-train --dataset medt_folder/gray")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            sources = datasets.load(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
            print(", ".join(f"{split}: {len(source)}" for split, source in sources.items()))
        elif args.medt_folder:
            written = hela_nuclei.export_medt_folder(args.directory)
            print(", ".join(f"{split}: frames {f[0]}-{f[-1]}" for split, f in written.items())
                  + f" written to {args.directory}/<split>/img and labelcol")
        else:
            written = hela_nuclei.export_frames(args.directory, args.split)
            print(f"wrote frames {written[0]}-{written[-1]} to {args.directory}/images and {args.directory}/masks")
    except datasets.DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
