"""Commands that are not a Trainer run (python -m lit_internvl prepare|export|chat|report): thin argparse layers over library calls; nothing in the library imports them."""
