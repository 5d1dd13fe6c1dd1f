"""`python -m cpr.run`: a training script as a supervised job whose dead ranks are replaced one by one
(see `cpr.elastic.launch`)."""
import sys

from cpr.elastic.launch import main

if __name__ == "__main__":
    sys.exit(main())
