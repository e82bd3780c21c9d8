"""Facial keypoints pipeline: the net4/net5 experiment.

The modules here are the programs (the stages, predict, mlproject); the folders are the library they
use, in wings that import only downward: base <- faces <- training, evaluation <- tracking.
"""
