"""The papers' experiments, built on the core (never imported by it): the subspace simulation
and its score networks (``simulation``, ``nets``, ``analytic``), generative optimisation
(``optimize``: the gradient-guidance paper's Algorithms 1 and 2), the demos
(``demo_mixture``, ``demo_optimize``) and PixelAsParam on the 8x8 digits (``digits``,
``evaluation``). Their trained weights ship in ``gradguide/weights/``."""
