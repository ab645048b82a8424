"""Training of the bundled reference models (digits-unet, digits-dit, digits-t2i and the classifier).

Not product code: it produces the weights shipped in :mod:`diffquant.models`, reproducibly from a seed.
"""
