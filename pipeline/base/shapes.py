"""What the parts of the pipeline agree on about faces and nets, with no import of their own: the
params (base.config), the network (base.model) and the Kaggle layout (faces.kaggle) all read it."""

KEYPOINTS = (
    "left_eye_center",
    "right_eye_center",
    "left_eye_inner_corner",
    "left_eye_outer_corner",
    "right_eye_inner_corner",
    "right_eye_outer_corner",
    "left_eyebrow_inner_end",
    "left_eyebrow_outer_end",
    "right_eyebrow_inner_end",
    "right_eyebrow_outer_end",
    "nose_tip",
    "mouth_left_corner",
    "mouth_right_corner",
    "mouth_center_top_lip",
    "mouth_center_bottom_lip",
)
KEYPOINT_COLUMNS = tuple(f"{name}_{axis}" for name in KEYPOINTS for axis in ("x", "y"))

# "left" is the subject's left, on the image's right: a horizontal flip swaps each pair.
FLIP_PAIRS = (
    (0, 2), (1, 3), (4, 8), (5, 9), (6, 10), (7, 11),
    (12, 16), (13, 17), (14, 18), (15, 19), (22, 24), (23, 25),
)

# The seed's width of the two dense layers: a net's that sets no hidden (model.KeypointNet's default).
HIDDEN = 500
