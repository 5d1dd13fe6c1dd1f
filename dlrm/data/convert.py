"""`python -m dlrm.data.convert IN.tsv OUT_DIR [--name NAME]`: Criteo TSV -> TorchRec npy triple."""
import argparse
import sys
import warnings

from dlrm.data.errors import CriteoDataError
from dlrm.data.npy import convert_tsv_to_npy, npy_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlrm.data.convert", description=__doc__)
    parser.add_argument("tsv", help="Criteo TSV file (Kaggle train.txt or 1TB day_N layout)")
    parser.add_argument("out_dir", help="folder for <name>_dense.npy, <name>_sparse.npy, <name>_labels.npy")
    parser.add_argument("--name", help="triple name (default: the TSV file's stem)")
    args = parser.parse_args(argv)
    # TorchRec's converter builds its datapipe from local functions; the pickling warning is noise here.
    warnings.filterwarnings("ignore", message="Local function is not supported by pickle")
    try:
        prefix = convert_tsv_to_npy(args.tsv, args.out_dir, args.name)
    except CriteoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in npy_files(prefix).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
