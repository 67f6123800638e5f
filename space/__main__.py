"""`python -m space`: the model and training are not implemented yet (issue 3)."""

import sys

if __name__ == "__main__":
    print("python -m space: not implemented yet; training and evaluation land with issues 3 and 4. "
          "Datasets: python -m datagen --help", file=sys.stderr)
    sys.exit(2)
