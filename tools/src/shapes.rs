//! The structured sample set: classes defined by shape, layout and texture, not by colour.
//!
//! Every image is two random colours (a foreground and a background with a random gradient and
//! per-pixel noise) and one [`ShapeKind`] drawn at a random scale, position and rotation. Colours,
//! contrast polarity, scale and position are drawn independently of the class, so colour
//! statistics carry (almost) no class information: a classifier must see the shape. The classes
//! are chosen to survive the training augmentation (horizontal flips: no left/right-handed
//! classes).

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// The structured classes, in class-index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    /// A filled disc.
    Disc,
    /// A filled square, rotated.
    Square,
    /// A filled equilateral triangle, rotated.
    Triangle,
    /// An annulus (a disc with a hole).
    Ring,
    /// A hollow square (a frame), rotated.
    Frame,
    /// A plus sign, rotated.
    Cross,
    /// Stripes over the whole image, within ±12° of horizontal.
    HorizontalStripes,
    /// Stripes over the whole image, within ±12° of vertical.
    VerticalStripes,
    /// A lattice of lines over the whole image, rotated.
    Lattice,
    /// A 3x3 grid of small dots, rotated.
    DotGrid,
}

impl ShapeKind {
    /// Every kind; class `c` of the structured set is `ALL[c]`.
    pub const ALL: [ShapeKind; 10] = [
        ShapeKind::Disc,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Ring,
        ShapeKind::Frame,
        ShapeKind::Cross,
        ShapeKind::HorizontalStripes,
        ShapeKind::VerticalStripes,
        ShapeKind::Lattice,
        ShapeKind::DotGrid,
    ];

    /// Short name (documentation, reports).
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Disc => "disc",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Ring => "ring",
            ShapeKind::Frame => "frame",
            ShapeKind::Cross => "cross",
            ShapeKind::HorizontalStripes => "horizontal_stripes",
            ShapeKind::VerticalStripes => "vertical_stripes",
            ShapeKind::Lattice => "lattice",
            ShapeKind::DotGrid => "dot_grid",
        }
    }

    /// Whether local coordinates `(u, v)` are foreground. Object frame: unit = object radius.
    /// Texture frame: unit = one period, `line` = the width of a line in periods.
    fn inside(self, u: f32, v: f32, line: f32) -> bool {
        let (au, av) = (u.abs(), v.abs());
        let r = (u * u + v * v).sqrt();
        match self {
            ShapeKind::Disc => r <= 1.0,
            ShapeKind::Square => au.max(av) <= 0.8,
            ShapeKind::Triangle => {
                // Circumradius 1, one vertex up: three half-planes at distance 0.5 from the centre.
                let n = [(0.0f32, -1.0f32), (0.866, 0.5), (-0.866, 0.5)];
                n.iter().all(|(a, b)| a * u + b * v <= 0.5)
            }
            ShapeKind::Ring => (0.55..=1.0).contains(&r),
            ShapeKind::Frame => (0.5..=0.8).contains(&au.max(av)),
            ShapeKind::Cross => (au <= 0.3 && av <= 1.0) || (av <= 0.3 && au <= 1.0),
            ShapeKind::HorizontalStripes | ShapeKind::VerticalStripes => v.rem_euclid(1.0) < line,
            ShapeKind::Lattice => u.rem_euclid(1.0) < line || v.rem_euclid(1.0) < line,
            ShapeKind::DotGrid => {
                // Dots at -0.66, 0, 0.66 on both axes, radius 0.2.
                let cell = |x: f32| x - (x / 0.66).round().clamp(-1.0, 1.0) * 0.66;
                let (du, dv) = (cell(u), cell(v));
                (du * du + dv * dv).sqrt() <= 0.2
            }
        }
    }

    /// Textures fill the image; objects sit on the background.
    fn is_texture(self) -> bool {
        matches!(self, ShapeKind::HorizontalStripes | ShapeKind::VerticalStripes | ShapeKind::Lattice)
    }

    /// Foreground area of an object in unit² (radius 1), or of one texture period for a line
    /// width `line`.
    fn unit_area(self, line: f32) -> f32 {
        use std::f32::consts::PI;
        match self {
            ShapeKind::Disc => PI,
            ShapeKind::Square => 1.6 * 1.6,
            ShapeKind::Triangle => 3.0 * 3.0f32.sqrt() / 4.0,
            ShapeKind::Ring => PI * (1.0 - 0.55 * 0.55),
            ShapeKind::Frame => 1.6 * 1.6 - 1.0,
            ShapeKind::Cross => 2.0 * 0.6 * 2.0 - 0.6 * 0.6,
            ShapeKind::DotGrid => 9.0 * PI * 0.2 * 0.2,
            ShapeKind::HorizontalStripes | ShapeKind::VerticalStripes => line,
            ShapeKind::Lattice => 1.0 - (1.0 - line) * (1.0 - line),
        }
    }
}

/// A random colour in 0..1 with a random luma, so that foreground and background can be pushed
/// apart in brightness whatever their hues.
fn random_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    [rng.random_range(0.0..1.0f32), rng.random_range(0.0..1.0f32), rng.random_range(0.0..1.0f32)]
}

fn luma(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// Foreground and background colours at least 0.25 apart in luma (redrawn until they are).
fn colour_pair(rng: &mut ChaCha8Rng) -> ([f32; 3], [f32; 3]) {
    loop {
        let (a, b) = (random_colour(rng), random_colour(rng));
        if (luma(a) - luma(b)).abs() >= 0.25 {
            return (a, b);
        }
    }
}

/// RGB pixels (`w·h·3`, row-major) of one image of `kind`.
pub fn paint(rng: &mut ChaCha8Rng, kind: ShapeKind, w: u32, h: u32) -> Vec<u8> {
    let (w, h) = (w as usize, h as usize);
    let side = w.min(h) as f32;
    let (fg, bg) = colour_pair(rng);
    // A second background colour, blended along a random direction: any colour on the same side
    // of the foreground's luma as the first, at least as far from it.
    let bg2 = loop {
        let c = random_colour(rng);
        let (d1, d2) = (luma(bg) - luma(fg), luma(c) - luma(fg));
        if d1.signum() == d2.signum() && d2.abs() >= 0.25 {
            break c;
        }
    };
    // A second foreground colour on the foreground's side of both background colours (at most
    // 64 tries, else the first one), blended along another direction.
    let apart = |c: [f32; 3]| {
        [bg, bg2].iter().all(|b| (luma(c) - luma(*b)).signum() == (luma(fg) - luma(*b)).signum())
            && [bg, bg2].iter().all(|b| (luma(c) - luma(*b)).abs() >= 0.25)
    };
    let fg2 = (0..64).map(|_| random_colour(rng)).find(|&c| apart(c)).unwrap_or(fg);
    let grad_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (gx, gy) = (grad_angle.cos(), grad_angle.sin());
    let fg_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (fx, fy) = (fg_angle.cos(), fg_angle.sin());
    let theta: f32 = match kind {
        ShapeKind::HorizontalStripes => rng.random_range(-0.21..0.21f32),
        ShapeKind::VerticalStripes => std::f32::consts::FRAC_PI_2 + rng.random_range(-0.21..0.21f32),
        _ => rng.random_range(0.0..std::f32::consts::TAU),
    };
    let (sin, cos) = theta.sin_cos();
    // The foreground covers a fraction `q` of the shorter side's square, drawn alike for every
    // class, so the mix of the two colours says nothing about the class. Object frame: centre
    // near the image centre (the evaluation crops the centre), radius from `q`. Texture frame:
    // one period in pixels, the line width from `q`.
    let q: f32 = rng.random_range(0.1..0.3f32);
    let (cx, cy) =
        (w as f32 * (0.5 + rng.random_range(-0.1..0.1f32)), h as f32 * (0.5 + rng.random_range(-0.1..0.1f32)));
    let line = match kind {
        ShapeKind::Lattice => 1.0 - (1.0 - q).sqrt(),
        _ => q,
    };
    let unit =
        if kind.is_texture() { side * rng.random_range(0.1..0.2f32) } else { side * (q / kind.unit_area(line)).sqrt() };
    let noise_amp = rng.random_range(2.0..30.0f32);
    let mut noise_state = rng.random::<u64>() | 1;
    let mut out = vec![0u8; w * h * 3];
    // 2x2 supersampling for anti-aliased edges.
    const SUB: [f32; 2] = [0.25, 0.75];
    for y in 0..h {
        for x in 0..w {
            let mut cover = 0.0f32;
            for sy in SUB {
                for sx in SUB {
                    let (px, py) = (x as f32 + sx - cx, y as f32 + sy - cy);
                    // Rotate into the object/texture frame.
                    let (u, v) = ((cos * px + sin * py) / unit, (-sin * px + cos * py) / unit);
                    if kind.inside(u, v, line) {
                        cover += 0.25;
                    }
                }
            }
            let (rx, ry) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
            let t = (rx * gx + ry * gy + 0.5).clamp(0.0, 1.0);
            let tf = (rx * fx + ry * fy + 0.5).clamp(0.0, 1.0);
            noise_state ^= noise_state << 13;
            noise_state ^= noise_state >> 7;
            noise_state ^= noise_state << 17;
            let noise = ((noise_state >> 56) as f32 - 128.0) / 128.0 * noise_amp;
            let i = (y * w + x) * 3;
            for ch in 0..3 {
                let back = bg[ch] * (1.0 - t) + bg2[ch] * t;
                let front = fg[ch] * (1.0 - tf) + fg2[ch] * tf;
                let v = (front * cover + back * (1.0 - cover)) * 255.0 + noise;
                out[i + ch] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// `unit_area` (what sizes every class to the same coverage) against a numerical
    /// integration of `inside`: objects over [-1.5, 1.5]², textures over one period.
    #[test]
    fn unit_areas_match_the_geometry() {
        let line = 0.2;
        for kind in ShapeKind::ALL {
            let (lo, span) = if kind.is_texture() { (0.0, 1.0) } else { (-1.5, 3.0) };
            let n = 600;
            let mut hits = 0usize;
            for i in 0..n {
                for j in 0..n {
                    let u = lo + span * (i as f32 + 0.5) / n as f32;
                    let v = lo + span * (j as f32 + 0.5) / n as f32;
                    hits += usize::from(kind.inside(u, v, line));
                }
            }
            let area = hits as f32 / (n * n) as f32 * span * span;
            let want = kind.unit_area(line);
            assert!((area - want).abs() < 0.01 * want.max(0.2), "{}: integrated {area}, formula {want}", kind.name());
        }
    }

    #[test]
    fn stripe_orientation_is_the_class() {
        // Horizontal stripes vary along y more than along x: compare mean absolute differences.
        let (w, h) = (80usize, 80usize);
        for seed in 0..4 {
            for (kind, horizontal) in [(ShapeKind::HorizontalStripes, true), (ShapeKind::VerticalStripes, false)] {
                let px = paint(&mut ChaCha8Rng::seed_from_u64(seed), kind, w as u32, h as u32);
                let g = |x: usize, y: usize| {
                    luma([px[(y * w + x) * 3] as f32, px[(y * w + x) * 3 + 1] as f32, px[(y * w + x) * 3 + 2] as f32])
                };
                let (mut dx, mut dy) = (0.0, 0.0);
                for y in 0..h - 1 {
                    for x in 0..w - 1 {
                        dx += (g(x + 1, y) - g(x, y)).abs();
                        dy += (g(x, y + 1) - g(x, y)).abs();
                    }
                }
                assert_eq!(dy > dx, horizontal, "{} seed {seed}: d/dx {dx} d/dy {dy}", kind.name());
            }
        }
    }

    #[test]
    fn same_seed_same_pixels() {
        let a = paint(&mut ChaCha8Rng::seed_from_u64(5), ShapeKind::Ring, 70, 50);
        let b = paint(&mut ChaCha8Rng::seed_from_u64(5), ShapeKind::Ring, 70, 50);
        let c = paint(&mut ChaCha8Rng::seed_from_u64(6), ShapeKind::Ring, 70, 50);
        assert_eq!(a.len(), 70 * 50 * 3);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
