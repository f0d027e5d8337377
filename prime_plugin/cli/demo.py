"""Run the demonstration: simulate a small data set, refine it, and show where the results are.

Not available yet in this version: the demonstration needs `prime refine`, which
arrives in a later release. The command says so and exits successfully.
"""


def add_args(parser):
    parser.add_argument("--o", default="prime_demo", metavar="DIR", help="output folder (default: prime_demo)")


def main(args):
    print("prime demo: the demonstration refinement is not available yet in this version "
          "(it needs `prime refine`, still under construction). Nothing was written.")
    return 0
