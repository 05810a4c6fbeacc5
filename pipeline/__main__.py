"""`python -m pipeline ARGS…` runs the Beam job, as `walkeros-klaviyo run ARGS…` does."""

import sys

from pipeline.run_job import main

sys.exit(main(sys.argv[1:]))
