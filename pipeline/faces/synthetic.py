"""Deterministic synthetic faces with exact keypoints, in the Kaggle Facial Keypoints layout.

Each face is drawn in a canonical frame (the Kaggle mean face) and warped into the image by a
random pose; every keypoint goes through the very same pose, so it lies exactly on the feature
drawn for it. Features are soft-edged distance fields evaluated over the pixel grid, which
anti-aliases without supersampling.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from pipeline.base.config import MISSING_PATTERNS
from pipeline.faces.kaggle import IMAGE_SIZE, KAGGLE_MEANS, KEYPOINTS

_CENTRE = IMAGE_SIZE / 2
_MAX_ROLL = np.radians(15.0)
_MAX_YAW = 0.35
_SCALE_RANGE = (0.85, 1.15)
# A wide shift and a background that stands apart from the skin give the small net a strong,
# easily found signal: with the seed's schedule compressed into a few hundred SGD steps, faces
# centred on a background of their own tone keep it on the mean-shape plateau throughout.
_MAX_SHIFT = 12.0
_BACKGROUND_CONTRAST = (60.0, 150.0)
_DARK_BACKGROUND_PROBABILITY = 0.7
_KEYPOINT_MARGIN = 1.0
# Yaw turns the face on a vertical cylinder; it must be wider than anything drawn (hair, ears),
# or the far side would fold over itself.
_HEAD_RADIUS = 55.0
# The nose tip stands proud of the face, so it swings further sideways when the head turns.
_NOSE_RADIUS = 63.0
# A face crop centres the head outline, not the midline, so a turn slides the features inside it.
_CROP_HALF_WIDTH = 39.0
_GLASSES_PROBABILITY = 0.25
_HAIR_PROBABILITY = 0.9
# Like Kaggle: these four are labelled in (almost) every row, and most partial rows lack all others.
_ALWAYS_LABELLED = ("left_eye_center", "right_eye_center", "nose_tip", "mouth_center_bottom_lip")
_ALL_OPTIONAL_MISSING_PROBABILITY = 0.7

_AT = {name: index for index, name in enumerate(KEYPOINTS)}
_EYE_AND_BROW_PARTS = ("eye_center", "eye_inner_corner", "eye_outer_corner",
                       "eyebrow_inner_end", "eyebrow_outer_end")


@dataclass(frozen=True)
class _Pose:
    roll: float
    scale: float
    yaw: float
    shift: tuple[float, float]


@dataclass(frozen=True)
class _Head:
    centre_y: float
    half_width: float
    half_height: float


def render_faces(n: int, seed: int, missing_fraction: float,
                 missing_pattern: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """Render n synthetic 96x96 grayscale faces, round(missing_fraction * n) of them partly labelled, as
    `missing_pattern` (MISSING_PATTERNS) says.
    Returns (images, keypoints): images uint8 of shape (n, 96, 96); keypoints float64 of shape
    (n, 30) in pixels, in pipeline.faces.kaggle.KEYPOINT_COLUMNS order, NaN where a keypoint is 'not labelled'.
    The images are those of the same seed whatever the missing keypoints: they are drawn first."""
    _validate_arguments(n, missing_fraction, missing_pattern)
    rng = np.random.default_rng(seed)
    grid = _pixel_grid()
    mean_face = _canonical_mean_face()
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    keypoints = np.empty((n, 2 * len(KEYPOINTS)))
    for row in range(n):
        images[row], keypoints[row] = _render_face(rng, grid, mean_face)
    missing = _choose_missing_keypoints(rng, n, missing_fraction, missing_pattern)
    keypoints[np.repeat(missing, 2, axis=1)] = np.nan
    return images, keypoints


def _validate_arguments(n, missing_fraction, missing_pattern) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(missing_fraction, bool) or not isinstance(missing_fraction, numbers.Real) \
            or not 0 <= missing_fraction < 1:
        raise ValueError(f"missing_fraction must be a number in [0, 1), got {missing_fraction!r}")
    if missing_pattern not in MISSING_PATTERNS:
        raise ValueError(f"missing_pattern must be one of {', '.join(MISSING_PATTERNS)}, got {missing_pattern!r}")


def _pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    # Pixel j covers [j, j + 1), so its centre is j + 0.5: the pipeline's flip x -> 96 - x then
    # maps a mirrored image exactly onto its mirrored keypoints.
    centres = np.arange(IMAGE_SIZE) + 0.5
    return tuple(np.meshgrid(centres, centres))


def _canonical_mean_face() -> np.ndarray:
    # Random roll and yaw shrink the average face towards the centre by E[cos] = sin(m) / m;
    # spreading the canonical face by the inverse keeps the column means on Kaggle's.
    roll_shrink = np.sin(_MAX_ROLL) / _MAX_ROLL
    yaw_shrink = np.sin(_MAX_YAW) / _MAX_YAW
    points = KAGGLE_MEANS.reshape(-1, 2)
    return _CENTRE + (points - _CENTRE) / np.array([roll_shrink * yaw_shrink, roll_shrink])


def _render_face(rng, grid, mean_face) -> tuple[np.ndarray, np.ndarray]:
    points = _sample_face_shape(rng, mean_face)
    pose = _sample_pose(rng, points)
    head = _sample_head(rng, points)
    face = _to_canonical(grid, pose, _HEAD_RADIUS)
    nose = _to_canonical(grid, pose, _NOSE_RADIUS)
    pixel = 1.0 / pose.scale
    skin = rng.uniform(90.0, 205.0)
    canvas = _background(rng, grid, skin)
    canvas = _paint_head(canvas, rng, face, points, head, skin, pixel)
    canvas = _paint_eyes(canvas, rng, face, points, skin, pixel)
    canvas = _paint_brows(canvas, rng, face, points, skin, pixel)
    canvas = _paint_nose(canvas, rng, face, nose, points, skin, pixel)
    canvas = _paint_mouth(canvas, rng, face, points, skin, pixel)
    if rng.random() < _GLASSES_PROBABILITY:
        canvas = _paint_glasses(canvas, rng, face, points, head, pixel)
    return _photograph(canvas, rng, grid), _keypoints_to_image(points, pose).ravel()


def _sample_face_shape(rng, mean_face) -> np.ndarray:
    """Canonical keypoints of one face; every variation is symmetric around zero, so means hold."""
    points = mean_face.copy()
    eye_spread, brow_raise, nose_drop, mouth_drop, mouth_widen, smile, lips_apart = rng.uniform(
        [-1.5, -2.0, -2.5, -2.5, -3.0, -1.5, -1.2], [1.5, 2.0, 2.5, 2.5, 3.0, 1.5, 1.2])
    for part in _EYE_AND_BROW_PARTS:
        points[_AT["left_" + part], 0] += eye_spread
        points[_AT["right_" + part], 0] -= eye_spread
    for part in ("eyebrow_inner_end", "eyebrow_outer_end"):
        points[[_AT["left_" + part], _AT["right_" + part]], 1] -= brow_raise
    gaze = rng.uniform([-1.2, -0.5], [1.2, 0.5])
    points[[_AT["left_eye_center"], _AT["right_eye_center"]]] += gaze
    points[_AT["nose_tip"], 1] += nose_drop
    mouth = [_AT[name] for name in KEYPOINTS if name.startswith("mouth")]
    points[mouth, 1] += mouth_drop
    points[[_AT["mouth_left_corner"], _AT["mouth_right_corner"]]] += [[mouth_widen, -smile],
                                                                     [-mouth_widen, -smile]]
    points[_AT["mouth_center_top_lip"], 1] -= lips_apart
    points[_AT["mouth_center_bottom_lip"], 1] += lips_apart
    return points


def _sample_pose(rng, points) -> _Pose:
    roll = rng.uniform(-_MAX_ROLL, _MAX_ROLL)
    scale = rng.uniform(*_SCALE_RANGE)
    yaw = rng.uniform(-_MAX_YAW, _MAX_YAW)
    unshifted = _keypoints_to_image(points, _Pose(roll, scale, yaw, (0.0, 0.0)))
    # Clipping only the shift keeps every keypoint inside the image without biasing the shape.
    low = _KEYPOINT_MARGIN - unshifted.min(axis=0)
    high = IMAGE_SIZE - _KEYPOINT_MARGIN - unshifted.max(axis=0)
    shift = np.clip(rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2), low, high)
    return _Pose(roll, scale, yaw, (float(shift[0]), float(shift[1])))


def _sample_head(rng, points) -> _Head:
    half_width = rng.uniform(38.5, 43.0)
    half_height = half_width * rng.uniform(1.15, 1.3)
    chin = points[_AT["mouth_center_bottom_lip"], 1] + rng.uniform(10.0, 16.0)
    return _Head(chin - half_height, half_width, half_height)


def _yaw_centring(yaw):
    return _HEAD_RADIUS * np.sqrt(1 - (_CROP_HALF_WIDTH / _HEAD_RADIUS) ** 2) * np.sin(yaw)


def _turn(x, yaw, radius):
    return _CENTRE + radius * np.sin(np.arcsin((x - _CENTRE) / radius) + yaw) - _yaw_centring(yaw)


def _unturn(x, yaw, radius):
    # Pixels beyond the cylinder's silhouette see its rim, which lies outside every drawn feature.
    sine = np.clip((x - _CENTRE + _yaw_centring(yaw)) / radius, -1.0, 1.0)
    return _CENTRE + radius * np.sin(np.arcsin(sine) - yaw)


def _to_image(points, pose: _Pose, radius: float) -> np.ndarray:
    x = _turn(points[:, 0], pose.yaw, radius) - _CENTRE
    y = points[:, 1] - _CENTRE
    cos, sin = np.cos(pose.roll), np.sin(pose.roll)
    return np.stack([_CENTRE + pose.shift[0] + pose.scale * (cos * x - sin * y),
                     _CENTRE + pose.shift[1] + pose.scale * (sin * x + cos * y)], axis=1)


def _to_canonical(grid, pose: _Pose, radius: float):
    """Exact inverse of _to_image: where in the canonical face each pixel looks."""
    x = (grid[0] - _CENTRE - pose.shift[0]) / pose.scale
    y = (grid[1] - _CENTRE - pose.shift[1]) / pose.scale
    cos, sin = np.cos(pose.roll), np.sin(pose.roll)
    return _unturn(_CENTRE + cos * x + sin * y, pose.yaw, radius), _CENTRE - sin * x + cos * y


def _keypoints_to_image(points, pose: _Pose) -> np.ndarray:
    image = _to_image(points, pose, _HEAD_RADIUS)
    nose_tip = _AT["nose_tip"]
    image[nose_tip] = _to_image(points[nose_tip:nose_tip + 1], pose, _NOSE_RADIUS)[0]
    return image


def _length(dx, dy):
    # np.hypot is an order of magnitude slower, and the overflow it guards against cannot occur.
    return np.sqrt(dx * dx + dy * dy)


def _coverage(distance, edge_width):
    """Share of a pixel covered by the shape with this signed distance (negative inside)."""
    return np.clip(0.5 - distance / edge_width, 0.0, 1.0)


def _blend(canvas, coverage, tone):
    return canvas + coverage * (tone - canvas)


def _ellipse_distance(x, y, centre_x, centre_y, half_width, half_height):
    radius = _length((x - centre_x) / half_width, (y - centre_y) / half_height)
    return (radius - 1.0) * min(half_width, half_height)


def _segment_distance(x, y, start, end):
    direction = np.subtract(end, start)
    t = ((x - start[0]) * direction[0] + (y - start[1]) * direction[1]) / direction.dot(direction)
    t = np.clip(t, 0.0, 1.0)
    return _length(x - start[0] - t * direction[0], y - start[1] - t * direction[1])


def _segment_frame(x, y, start, end):
    """Coordinates along start->end from its midpoint and across it (positive down); half length."""
    middle = (np.asarray(start) + end) / 2
    half_length = _length(*np.subtract(end, start)) / 2
    axis = np.subtract(end, start) / (2 * half_length)
    normal = np.array([-axis[1], axis[0]]) * np.sign(axis[0])
    dx, dy = x - middle[0], y - middle[1]
    return dx * axis[0] + dy * axis[1], dx * normal[0] + dy * normal[1], half_length


def _arch(along, half_length, height, peak=0.0):
    """A curve through both ends of a segment (0 at along = +-half_length), `height` at `peak`."""
    span = half_length + peak * np.sign(peak - along)
    return height * (1.0 - ((along - peak) / span) ** 2)


def _background(rng, grid, skin):
    contrast = rng.uniform(*_BACKGROUND_CONTRAST)
    darker = rng.random() < _DARK_BACKGROUND_PROBABILITY or skin + contrast > 250.0
    level = max(skin - contrast, 5.0) if darker else skin + contrast
    slope = rng.uniform(-25.0, 25.0, size=2)
    return level + (slope[0] * (grid[0] - _CENTRE) + slope[1] * (grid[1] - _CENTRE)) / _CENTRE


def _paint_head(canvas, rng, face, points, head, skin, pixel):
    """Long hair behind, neck, ears, the shaded head, then the hair on top of it."""
    x, y = face
    radius = _length((x - _CENTRE) / head.half_width, (y - head.centre_y) / head.half_height)
    outline = (radius - 1.0) * head.half_width
    has_hair = rng.random() < _HAIR_PROBABILITY
    strands = _hair_strands(rng, face, head)
    volume = rng.uniform(1.0, 5.0)
    hair_end = rng.uniform(points[_AT["left_eye_center"], 1], 110.0)
    hairline = _hairline(rng, x, head)
    if has_hair:
        hair_behind = np.maximum(outline - volume, y - hair_end)
        canvas = _blend(canvas, _coverage(hair_behind, pixel), strands)
    neck = np.maximum(np.abs(x - _CENTRE) - 0.55 * head.half_width, head.centre_y - y)
    canvas = _blend(canvas, _coverage(neck, pixel), 0.7 * skin)
    ear_y = points[_AT["left_eye_center"], 1] + 12.0
    for side in (-1, 1):
        ear = _ellipse_distance(x, y, _CENTRE + side * (head.half_width - 1.0), ear_y, 4.5, 8.5)
        canvas = _blend(canvas, _coverage(ear, pixel), 0.85 * skin)
    # Darkening towards the outline is what makes a flat ellipse read as a rounded head.
    shaded_skin = skin * (1 - 0.25 * np.minimum(radius, 1) ** 6)
    canvas = _blend(canvas, _coverage(outline, pixel), shaded_skin)
    if has_hair:
        hair_on_top = np.maximum(outline - volume, y - hairline)
        canvas = _blend(canvas, _coverage(hair_on_top, pixel), strands)
    return canvas


def _hair_strands(rng, face, head):
    x, y = face
    tone = rng.uniform(15.0, 70.0) if rng.random() < 0.75 else rng.uniform(140.0, 230.0)
    # Strands fan out from the crown, as combed hair does.
    fan = np.arctan2(x - _CENTRE, y - (head.centre_y - head.half_height))
    phase = rng.uniform(0, 2 * np.pi)
    return tone * (1 + 0.05 * np.sin(36.0 * fan + 2.0 * np.sin(5.0 * fan) + phase))


def _hairline(rng, x, head):
    # It dips towards the temples, yet stays above y = 24 wherever ((x - centre) / half_width)^2
    # is below 0.8: that is where the eyebrows are, and hair must not hide them.
    top = rng.uniform(5.0, 18.0)
    temple_dip = rng.uniform(0.2, 1.0) * (24.0 - top) / 0.8
    return top + temple_dip * ((x - _CENTRE) / head.half_width) ** 2


def _paint_eyes(canvas, rng, face, points, skin, pixel):
    look = dict(opening_up=rng.uniform(2.3, 3.6), opening_low=rng.uniform(1.6, 2.6),
                iris_radius=rng.uniform(2.7, 3.3), iris=skin * rng.uniform(0.15, 0.45),
                sclera=skin + (255.0 - skin) * rng.uniform(0.3, 0.6),
                lash=skin * rng.uniform(0.1, 0.3))
    for side in ("left", "right"):
        centre, inner, outer = (points[_AT[f"{side}_eye_{part}"]]
                                for part in ("center", "inner_corner", "outer_corner"))
        canvas = _paint_eye(canvas, face, centre, inner, outer, look, pixel)
    return canvas


def _paint_eye(canvas, face, centre, inner, outer, look, pixel):
    x, y = face
    along, across, half = _segment_frame(x, y, inner, outer)
    socket = _length(along / (half + 3.0), (across + 0.5) / 5.5)
    canvas = _blend(canvas, 0.15 * _coverage(socket - 0.7, 0.6), 0.0)
    top = _arch(along, half, -look["opening_up"])
    bottom = _arch(along, half, look["opening_low"])
    to_centre = _length(x - centre[0], y - centre[1])
    iris_radius = look["iris_radius"]
    ball = _blend(look["sclera"], _coverage(to_centre - iris_radius, pixel), look["iris"])
    ball = _blend(ball, _coverage(to_centre - 0.45 * iris_radius, pixel), 0.4 * look["iris"])
    glint = _length(x - centre[0] + 0.5 * iris_radius, y - centre[1] + 0.5 * iris_radius)
    ball = _blend(ball, _coverage(glint - 0.2 * iris_radius, pixel), 250.0)
    canvas = _blend(canvas, _coverage(np.maximum(top - across, across - bottom), pixel), ball)
    beyond_corners = np.abs(along) - half
    upper_lid = np.maximum(np.abs(across - top) - 0.6, beyond_corners)
    canvas = _blend(canvas, _coverage(upper_lid, pixel), look["lash"])
    lower_lid = np.maximum(np.abs(across - bottom) - 0.3, beyond_corners)
    canvas = _blend(canvas, 0.5 * _coverage(lower_lid, pixel), look["lash"])
    crease = np.maximum(np.abs(across - _arch(along, half, -look["opening_up"] - 2.0)) - 0.3,
                        beyond_corners)
    return _blend(canvas, 0.3 * _coverage(crease, pixel), look["lash"])


def _paint_brows(canvas, rng, face, points, skin, pixel):
    arch, thickness = rng.uniform(0.5, 2.5), rng.uniform(1.4, 3.0)
    tone = skin * rng.uniform(0.2, 0.6)
    for side in ("left", "right"):
        inner = points[_AT[f"{side}_eyebrow_inner_end"]]
        outer = points[_AT[f"{side}_eyebrow_outer_end"]]
        along, across, half = _segment_frame(*face, inner, outer)
        on_stroke = np.clip(along, -half, half)
        centreline = _arch(on_stroke, half, -arch, peak=0.3 * half)
        # Brows thin out from the inner to the outer end.
        width = thickness * (1.15 - 0.3 * (on_stroke / half + 1) / 2)
        distance = _length(along - on_stroke, across - centreline) - width / 2
        canvas = _blend(canvas, 0.9 * _coverage(distance, pixel), tone)
    return canvas


def _paint_nose(canvas, rng, face, nose, points, skin, pixel):
    x, y = face
    nose_x, nose_y = nose
    tip_x, tip_y = points[_AT["nose_tip"]]
    width = rng.uniform(3.5, 5.5)
    side = rng.choice([-1.0, 1.0])
    eyes_y = points[_AT["left_eye_center"], 1]
    bridge = _segment_distance(x, y, (tip_x + 2 * side, eyes_y + 5),
                               (tip_x + side * width, tip_y - 2))
    canvas = _blend(canvas, 0.12 * _coverage(bridge - 1.2, 2.5), 0.0)
    under = _ellipse_distance(nose_x, nose_y, tip_x, tip_y + 2.8, width + 0.5, 1.6)
    canvas = _blend(canvas, 0.2 * _coverage(under, 1.5), 0.0)
    for wing in (-1, 1):
        flank = _ellipse_distance(nose_x, nose_y, tip_x + 0.85 * wing * width, tip_y + 0.8,
                                  2.3, 2.0)
        canvas = _blend(canvas, 0.12 * _coverage(flank, 1.0), 0.0)
    tip = _ellipse_distance(nose_x, nose_y, tip_x, tip_y, 2.2, 1.8)
    canvas = _blend(canvas, 0.6 * _coverage(tip, 2.0), min(255.0, 1.15 * skin))
    for wing in (-1, 1):
        nostril = _ellipse_distance(nose_x, nose_y, tip_x + 0.45 * wing * width, tip_y + 2.1,
                                    1.4, 0.8)
        canvas = _blend(canvas, _coverage(nostril, pixel), 0.3 * skin)
    return canvas


def _paint_mouth(canvas, rng, face, points, skin, pixel):
    right, left = points[_AT["mouth_right_corner"]], points[_AT["mouth_left_corner"]]
    along, across, half = _segment_frame(*face, right, left)
    top_along, top_across, _ = _segment_frame(*points[_AT["mouth_center_top_lip"]], right, left)
    bottom_along, bottom_across, _ = _segment_frame(*points[_AT["mouth_center_bottom_lip"]],
                                                    right, left)
    upper_lip, lower_lip = rng.uniform(1.2, 2.2), rng.uniform(1.5, 2.6)
    lips = skin * rng.uniform(0.55, 0.78)
    outer_top = _arch(along, half, top_across, top_along)
    outer_bottom = _arch(along, half, bottom_across, bottom_along)
    inner_top = _arch(along, half, top_across + upper_lip, top_along)
    inner_bottom = _arch(along, half, bottom_across - lower_lip, bottom_along)
    meeting = (inner_top + inner_bottom) / 2
    chin_shadow = _length((along - bottom_along) / half, (across - bottom_across - 2.5) / 2.0)
    canvas = _blend(canvas, 0.15 * _coverage(chin_shadow - 0.6, 0.6), 0.0)
    # The upper lip faces down, away from the light.
    lip_tone = np.where(across < meeting, 0.85 * lips, lips)
    canvas = _blend(canvas, _coverage(np.maximum(outer_top - across, across - outer_bottom), pixel),
                    lip_tone)
    beyond_corners = np.abs(along) - half
    teeth = _blend(0.2 * skin, _coverage(across - inner_top - 1.2, pixel),
                   min(255.0, 1.05 * skin + 15))
    # Beyond the corners the inner arches cross over; only the span between the corners is mouth.
    opening = np.maximum(np.maximum(inner_top - across, across - inner_bottom), beyond_corners)
    canvas = _blend(canvas, _coverage(opening, pixel), teeth)
    lip_line = np.maximum(np.abs(across - meeting) - 0.4, beyond_corners)
    return _blend(canvas, 0.8 * _coverage(lip_line, pixel), 0.3 * skin)


def _paint_glasses(canvas, rng, face, points, head, pixel):
    x, y = face
    tone, thickness = rng.uniform(10.0, 90.0), rng.uniform(0.7, 1.6)
    margin, half_height = rng.uniform(2.0, 4.0), rng.uniform(4.5, 6.5)
    rim_ends = []
    for side in ("left", "right"):
        inner = points[_AT[f"{side}_eye_inner_corner"]]
        outer = points[_AT[f"{side}_eye_outer_corner"]]
        centre = (inner + outer) / 2 + (0.0, 0.8)
        half_width = abs(outer[0] - inner[0]) / 2 + margin
        # A superellipse gives the rounded-rectangle look of real frames.
        radius = (np.abs((x - centre[0]) / half_width) ** 4
                  + np.abs((y - centre[1]) / half_height) ** 4) ** 0.25
        rim = np.abs(radius - 1.0) * min(half_width, half_height) - thickness / 2
        canvas = _blend(canvas, _coverage(rim, pixel), tone)
        outward = np.sign(outer[0] - inner[0])
        rim_ends.append((centre[0] - outward * half_width, centre[0] + outward * half_width,
                         centre[1] - 1))
    (left_inner, left_outer, left_y), (right_inner, right_outer, right_y) = rim_ends
    arms = [((right_inner, right_y), (left_inner, left_y)),
            ((left_outer, left_y), (_CENTRE + head.half_width, left_y)),
            ((right_outer, right_y), (_CENTRE - head.half_width, right_y))]
    frame = np.minimum.reduce([_segment_distance(x, y, start, end) for start, end in arms])
    return _blend(canvas, _coverage(frame - thickness / 2, pixel), tone)


def _photograph(canvas, rng, grid) -> np.ndarray:
    light = rng.uniform(-0.25, 0.25, size=2)
    lit = canvas * (1 + (light[0] * (grid[0] - _CENTRE) + light[1] * (grid[1] - _CENTRE))
                    / _CENTRE)
    mean = lit.mean()
    contrasted = mean + rng.uniform(0.7, 1.3) * (lit - mean)
    noisy = contrasted + rng.normal(0.0, rng.uniform(0.5, 6.0), size=lit.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _choose_missing_keypoints(rng, n, missing_fraction, missing_pattern="random") -> np.ndarray:
    """(n, 15) mask of unlabelled keypoints, for round(missing_fraction * n) random rows, as `missing_pattern`
    says: "random", 70% of the rows lack all 11 outer keypoints and the others a random 1 to 10 of them;
    "kaggle", every row all 11, as in Kaggle's file, where most rows have only the 4 central keypoints. The
    rows are drawn alike for both; "random" then draws on for each row, what it drew before "kaggle" existed,
    so that a seed gives the same CSV as then."""
    missing = np.zeros((n, len(KEYPOINTS)), dtype=bool)
    optional = np.array([_AT[name] for name in KEYPOINTS if name not in _ALWAYS_LABELLED])
    rows = rng.choice(n, size=round(missing_fraction * n), replace=False)
    if missing_pattern == "kaggle":
        missing[np.ix_(rows, optional)] = True
        return missing
    for row in rows:
        if rng.random() < _ALL_OPTIONAL_MISSING_PROBABILITY:
            missing[row, optional] = True
        else:
            count = rng.integers(1, len(optional))
            missing[row, rng.choice(optional, size=count, replace=False)] = True
    return missing
