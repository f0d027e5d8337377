# -*- coding: utf-8 -*-
"""
@article{Elmlund2013,
title = {PRIME: Probabilistic Initial 3D Model Generation for Single-Particle Cryo-Electron Microscopy},
journal = {Structure},
volume = {21},
number = {8},
pages = {1299-1306},
year = {2013},
doi = {http://dx.doi.org/10.1016/j.str.2013.07.002},
author = {Elmlund, Hans and Elmlund, Dominika and Bengio, Samy},
}

@article{Reboul2016,
title = {A Stochastic Hill Climbing Approach for Simultaneous 2D Alignment and Clustering of Cryogenic Electron Microscopy Images},
journal = {Structure},
volume = {24},
number = {6},
pages = {988-996},
year = {2016},
doi = {http://dx.doi.org/10.1016/j.str.2016.04.006},
author = {Reboul, Cyril F. and Bonnet, Frederic and Elmlund, Dominika and Elmlund, Hans},
}

@article{Reboul2018,
title = {Single-particle cryo-EM - Improved ab initio 3D reconstruction with SIMPLE/PRIME},
journal = {Protein Science},
volume = {27},
number = {1},
pages = {51-61},
year = {2018},
doi = {http://dx.doi.org/10.1002/pro.3266},
author = {Reboul, Cyril F. and Eager, Michael and Elmlund, Dominika and Elmlund, Hans},
}

@article{Reboul2018b,
title = {Rapid near-atomic resolution single-particle 3D reconstruction with SIMPLE},
journal = {Journal of Structural Biology},
volume = {204},
number = {2},
pages = {172-181},
year = {2018},
doi = {http://dx.doi.org/10.1016/j.jsb.2018.08.005},
author = {Reboul, Cyril F. and Kiesewetter, Simon and Eager, Michael and Belousoff, Matthew and Cui, Tiangang and De Sterck, Hans and Elmlund, Dominika and Elmlund, Hans},
}
"""
