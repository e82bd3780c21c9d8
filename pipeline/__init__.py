"""Facial keypoints pipeline: data, training and evaluation of the net4/net5 experiment."""
