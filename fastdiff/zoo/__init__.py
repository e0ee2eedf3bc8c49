"""Small real models trained in this repository, with their weights committed (loaded offline).

- :mod:`fastdiff.zoo.digits`: a class-conditional denoiser for scikit-learn's 8x8 handwritten
  digits, a noise-conditional digit classifier (classifier guidance) and a clean-digit classifier
  (features for a Fréchet distance, accuracy of class-conditional samples).
"""
