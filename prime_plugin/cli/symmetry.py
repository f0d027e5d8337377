"""Print the operators of a point group as JSON (a list of 3x3 rotation matrices).

The same operators as `relion_refine --print_symmetry_ops --sym G`, with RELION's
axes: C<n> and D<n> about z (D's 2-fold along x), T, O, I (I2 by default).
"""

import json


def add_args(parser):
    parser.add_argument("--sym", required=True, metavar="G", help="point group: C<n>, D<n>, T, O or I")


def main(args):
    from prime_plugin.core.symmetry import symmetry_operators

    operators = symmetry_operators(args.sym)
    print(json.dumps([[[round(float(x), 12) + 0.0 for x in row] for row in matrix] for matrix in operators]))
    return 0
