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
@article{Chen2013,
title = {High-resolution noise substitution to measure overfitting and validate resolution in 3D structure determination by single particle electron cryomicroscopy},
journal = {Ultramicroscopy},
volume = {135},
pages = {24-35},
year = {2013},
doi = {http://dx.doi.org/10.1016/j.ultramic.2013.06.004},
author = {Chen, Shaoxia and McMullan, Greg and Faruqi, Abdul R. and Murshudov, Garib N. and Short, Judith M. and Scheres, Sjors H. W. and Henderson, Richard},
}

@article{Rosenthal2003,
title = {Optimal determination of particle orientation, absolute hand, and contrast loss in single-particle electron cryomicroscopy},
journal = {Journal of Molecular Biology},
volume = {333},
number = {4},
pages = {721-745},
year = {2003},
doi = {http://dx.doi.org/10.1016/j.jmb.2003.07.013},
author = {Rosenthal, Peter B. and Henderson, Richard},
}
"""
