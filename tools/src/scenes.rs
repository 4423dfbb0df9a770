//! The object-centric scenes set: each image a scene of 1-3 small copies of its class's shape.
//!
//! Ten classes, one per [`ObjectKind`] (circle, square, triangle, star, cross, ring, hexagon,
//! crescent, arrow, stripes patch). Every image: a flat random background, a few random clutter
//! strokes (line segments of random colour, length and width), then 1 to `max_objects` copies of
//! the class's shape, each at its own random position, size, rotation and colour (at least 0.2
//! from the background in luma, so it is visible), and a little per-pixel noise. The count, the
//! positions, the sizes and every colour are drawn alike for every class; object sizes are
//! equal-area (an object of size `d` covers the area of a square of side `d` x the image side,
//! whatever its shape), so the amount of foreground says nothing about the class either: the class
//! is the shape, nothing else. Every shape is mirror-symmetric about some axis, so a horizontal
//! flip (the training augmentation) turns an instance into a rotated instance of the same class.
//!
//! Layout written under `out` by [`generate_scenes`]:
//!
//! ```text
//! out/train/<class>/<class>_<n>.jpg   train_per_class images per class
//! out/val/<class>/<class>_<n>.jpg     val_per_class images per class (other seeds)
//! out/scenes.tsv                      split, path, class, objects, sizes (one row per image)
//! out/preview.png                     the first 4 train images of each class, a class per row
//! ```
//!
//! Shard both with `sharder build` (the val split with `--classes` of the train shards'
//! `classes.txt`); `tools/learning-bench.sh` does.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fixtures::{FixtureError, encode_rgb, mix, write as write_file};

/// The scene classes, in class-index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Circle,
    Square,
    Triangle,
    /// Five-pointed star (inner radius 0.45).
    Star,
    /// Plus sign.
    Cross,
    /// Annulus (inner radius 0.6).
    Ring,
    Hexagon,
    /// A disc minus an offset disc.
    Crescent,
    /// Shaft and head, symmetric about its axis.
    Arrow,
    /// A square patch of three parallel bars (five equal bands, alternating).
    Stripes,
}

impl ObjectKind {
    /// Every kind; class `c` of the scenes set is `ALL[c]`.
    pub const ALL: [ObjectKind; 10] = [
        ObjectKind::Circle,
        ObjectKind::Square,
        ObjectKind::Triangle,
        ObjectKind::Star,
        ObjectKind::Cross,
        ObjectKind::Ring,
        ObjectKind::Hexagon,
        ObjectKind::Crescent,
        ObjectKind::Arrow,
        ObjectKind::Stripes,
    ];

    /// Class folder name.
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Circle => "circle",
            ObjectKind::Square => "square",
            ObjectKind::Triangle => "triangle",
            ObjectKind::Star => "star",
            ObjectKind::Cross => "cross",
            ObjectKind::Ring => "ring",
            ObjectKind::Hexagon => "hexagon",
            ObjectKind::Crescent => "crescent",
            ObjectKind::Arrow => "arrow",
            ObjectKind::Stripes => "stripes",
        }
    }

    /// Whether local coordinates `(u, v)` are inside the shape. Frame: unit = the shape's
    /// radius (every shape lies within the unit disc).
    fn inside(self, u: f32, v: f32) -> bool {
        let (au, av) = (u.abs(), v.abs());
        let r2 = u * u + v * v;
        match self {
            ObjectKind::Circle => r2 <= 1.0,
            ObjectKind::Square => au.max(av) <= 0.7,
            ObjectKind::Triangle => {
                let n = [(0.0f32, -1.0f32), (0.866, 0.5), (-0.866, 0.5)];
                n.iter().all(|(a, b)| a * u + b * v <= 0.5)
            }
            ObjectKind::Star => in_polygon(&star_vertices(), u, v),
            ObjectKind::Cross => (au <= 0.28 && av <= 0.95) || (av <= 0.28 && au <= 0.95),
            ObjectKind::Ring => (0.36..=1.0).contains(&r2),
            ObjectKind::Hexagon => {
                // Circumradius 1: apothem 0.866 along three directions.
                [(1.0f32, 0.0f32), (0.5, 0.866), (-0.5, 0.866)].iter().all(|(a, b)| (a * u + b * v).abs() <= 0.866)
            }
            ObjectKind::Crescent => r2 <= 1.0 && (u - 0.45) * (u - 0.45) + v * v > 0.8 * 0.8,
            ObjectKind::Arrow => {
                // Shaft from x = -0.97 to 0.15, half-width 0.22; head from 0.15 to 1, half-width 0.6.
                (-0.97..=0.15).contains(&u) && av <= 0.22 || (0.15..=1.0).contains(&u) && av <= 0.6 * (1.0 - u) / 0.85
            }
            ObjectKind::Stripes => au.max(av) <= 0.7 && ((v + 0.7) / 0.28).floor() as i32 % 2 == 0,
        }
    }

    /// Area in unit² (numerical, cached): what sizes every shape to the same area.
    pub fn unit_area(self) -> f32 {
        static AREAS: OnceLock<[f32; 10]> = OnceLock::new();
        let areas = AREAS.get_or_init(|| {
            let n = 400;
            ObjectKind::ALL.map(|k| {
                let mut hits = 0usize;
                for i in 0..n {
                    for j in 0..n {
                        let u = -1.0 + 2.0 * (i as f32 + 0.5) / n as f32;
                        let v = -1.0 + 2.0 * (j as f32 + 0.5) / n as f32;
                        hits += usize::from(k.inside(u, v));
                    }
                }
                hits as f32 / (n * n) as f32 * 4.0
            })
        });
        areas[ObjectKind::ALL.iter().position(|&k| k == self).unwrap_or(0)]
    }
}

fn star_vertices() -> [(f32, f32); 10] {
    std::array::from_fn(|i| {
        let r = if i % 2 == 0 { 1.0 } else { 0.45 };
        let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
        (r * a.cos(), r * a.sin())
    })
}

/// Even-odd point-in-polygon test.
fn in_polygon(p: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = p.len() - 1;
    for i in 0..p.len() {
        let ((xi, yi), (xj, yj)) = (p[i], p[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SceneSpec {
    /// Number of classes (at most 10: `ObjectKind::ALL[..classes]`).
    pub classes: usize,
    /// Images per class of the train split.
    pub train_per_class: usize,
    /// Images per class of the val split.
    pub val_per_class: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Nominal image side; each side is drawn in ±8 % of it.
    pub side: u32,
    /// Object size range: the side of the square of equal area, as a fraction of the shorter
    /// image side.
    pub min_size: f32,
    pub max_size: f32,
    /// Objects per image: 1 to this, uniform.
    pub max_objects: usize,
}

impl Default for SceneSpec {
    fn default() -> Self {
        Self {
            classes: 10,
            train_per_class: 120,
            val_per_class: 30,
            seed: 0,
            side: 200,
            min_size: 0.08,
            max_size: 0.25,
            max_objects: 3,
        }
    }
}

/// One object of a scene (pixel units).
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub cx: f32,
    pub cy: f32,
    /// Radius of the shape's frame (every shape lies within this disc).
    pub radius: f32,
    /// Equal-area size as a fraction of the shorter image side.
    pub size: f32,
    pub angle: f32,
    pub colour: [f32; 3],
}

/// One written image.
#[derive(Debug, Clone)]
pub struct SceneFile {
    /// `train` or `val`.
    pub split: &'static str,
    /// Path relative to the split folder: `<class>/<class>_<n>.jpg`.
    pub rel_path: String,
    pub class: usize,
    pub width: u32,
    pub height: u32,
    pub objects: Vec<Placed>,
}

/// What [`generate_scenes`] wrote.
#[derive(Debug, Clone)]
pub struct Scenes {
    pub train_dir: PathBuf,
    pub val_dir: PathBuf,
    pub files: Vec<SceneFile>,
}

fn luma(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

fn random_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    [rng.random_range(0.0..1.0f32), rng.random_range(0.0..1.0f32), rng.random_range(0.0..1.0f32)]
}

/// A colour at least `apart` from `bg` in luma (redrawn until it is).
fn colour_apart(rng: &mut ChaCha8Rng, bg: [f32; 3], apart: f32) -> [f32; 3] {
    loop {
        let c = random_colour(rng);
        if (luma(c) - luma(bg)).abs() >= apart {
            return c;
        }
    }
}

/// Paints one scene of `kind` at `w x h`: RGB pixels (row-major) and the objects drawn.
pub fn paint_scene(rng: &mut ChaCha8Rng, kind: ObjectKind, w: u32, h: u32, spec: &SceneSpec) -> (Vec<u8>, Vec<Placed>) {
    let (wu, hu) = (w as usize, h as usize);
    let side = w.min(h) as f32;
    let bg = random_colour(rng);
    let mut img: Vec<[f32; 3]> = vec![bg; wu * hu];

    // Clutter: 2-5 strokes, each a segment of random colour (visible on the background), length
    // 10-45 % of the side, width 1-3 px, anywhere.
    let strokes = rng.random_range(2..=5usize);
    for _ in 0..strokes {
        let colour = colour_apart(rng, bg, 0.15);
        let (x0, y0) = (rng.random_range(0.0..w as f32), rng.random_range(0.0..h as f32));
        let len = side * rng.random_range(0.1..0.45f32);
        let a: f32 = rng.random_range(0.0..std::f32::consts::TAU);
        let (x1, y1) = (x0 + len * a.cos(), y0 + len * a.sin());
        let half = rng.random_range(0.5..1.5f32);
        stroke(&mut img, wu, hu, (x0, y0), (x1, y1), half, colour);
    }

    // Objects: equal-area size, position within the central 84 % (the evaluation's centre crop
    // keeps 7/8 of the shorter side), a few tries to avoid overlapping an earlier object.
    let count = rng.random_range(1..=spec.max_objects.max(1));
    let mut placed: Vec<Placed> = Vec::with_capacity(count);
    for _ in 0..count {
        let size = rng.random_range(spec.min_size..=spec.max_size);
        let radius = size * side / kind.unit_area().sqrt();
        let (lo_x, hi_x) = (0.08 * w as f32 + radius, 0.92 * w as f32 - radius);
        let (lo_y, hi_y) = (0.08 * h as f32 + radius, 0.92 * h as f32 - radius);
        let pick = |rng: &mut ChaCha8Rng, lo: f32, hi: f32, mid: f32| {
            if hi > lo { rng.random_range(lo..hi) } else { mid }
        };
        let mut at = (0.0, 0.0);
        for _ in 0..20 {
            at = (pick(rng, lo_x, hi_x, w as f32 / 2.0), pick(rng, lo_y, hi_y, h as f32 / 2.0));
            let free = placed.iter().all(|p| {
                let (dx, dy) = (p.cx - at.0, p.cy - at.1);
                (dx * dx + dy * dy).sqrt() >= p.radius + radius
            });
            if free {
                break;
            }
        }
        let angle = rng.random_range(0.0..std::f32::consts::TAU);
        let colour = colour_apart(rng, bg, 0.2);
        let p = Placed { cx: at.0, cy: at.1, radius, size, angle, colour };
        draw_object(&mut img, wu, hu, kind, &p);
        placed.push(p);
    }

    let noise_amp = rng.random_range(0.0..8.0f32);
    let mut noise_state = rng.random::<u64>() | 1;
    let mut out = vec![0u8; wu * hu * 3];
    for (i, px) in img.iter().enumerate() {
        for ch in 0..3 {
            noise_state ^= noise_state << 13;
            noise_state ^= noise_state >> 7;
            noise_state ^= noise_state << 17;
            let noise = ((noise_state >> 56) as f32 - 128.0) / 128.0 * noise_amp;
            out[i * 3 + ch] = (px[ch] * 255.0 + noise).clamp(0.0, 255.0) as u8;
        }
    }
    (out, placed)
}

/// `px` covered by `colour` over a fraction `cover`.
fn blend(px: &mut [f32; 3], colour: [f32; 3], cover: f32) {
    for (p, c) in px.iter_mut().zip(colour) {
        *p = c * cover + *p * (1.0 - cover);
    }
}

/// 2x2 supersampled coverage blend over the object's bounding box.
fn draw_object(img: &mut [[f32; 3]], w: usize, h: usize, kind: ObjectKind, p: &Placed) {
    const SUB: [f32; 2] = [0.25, 0.75];
    let (sin, cos) = p.angle.sin_cos();
    let x0 = (p.cx - p.radius - 1.0).floor().max(0.0) as usize;
    let x1 = ((p.cx + p.radius + 1.0).ceil().max(0.0) as usize).min(w);
    let y0 = (p.cy - p.radius - 1.0).floor().max(0.0) as usize;
    let y1 = ((p.cy + p.radius + 1.0).ceil().max(0.0) as usize).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let mut cover = 0.0f32;
            for sy in SUB {
                for sx in SUB {
                    let (dx, dy) = (x as f32 + sx - p.cx, y as f32 + sy - p.cy);
                    let (u, v) = ((cos * dx + sin * dy) / p.radius, (-sin * dx + cos * dy) / p.radius);
                    if kind.inside(u, v) {
                        cover += 0.25;
                    }
                }
            }
            if cover > 0.0 {
                blend(&mut img[y * w + x], p.colour, cover);
            }
        }
    }
}

/// An anti-aliased segment of half-width `half` px.
fn stroke(img: &mut [[f32; 3]], w: usize, h: usize, a: (f32, f32), b: (f32, f32), half: f32, colour: [f32; 3]) {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = (dx * dx + dy * dy).max(1e-6);
    let pad = half + 1.0;
    let x0 = (a.0.min(b.0) - pad).floor().max(0.0) as usize;
    let x1 = ((a.0.max(b.0) + pad).ceil().max(0.0) as usize).min(w);
    let y0 = (a.1.min(b.1) - pad).floor().max(0.0) as usize;
    let y1 = ((a.1.max(b.1) + pad).ceil().max(0.0) as usize).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let (px, py) = (x as f32 + 0.5 - a.0, y as f32 + 0.5 - a.1);
            let t = ((px * dx + py * dy) / len2).clamp(0.0, 1.0);
            let (ex, ey) = (px - t * dx, py - t * dy);
            let d = (ex * ex + ey * ey).sqrt();
            let cover = (half + 0.5 - d).clamp(0.0, 1.0);
            if cover > 0.0 {
                blend(&mut img[y * w + x], colour, cover);
            }
        }
    }
}

/// Writes the scenes set under `out` (created if missing; existing files with the same names are
/// overwritten). The result depends only on `spec`.
pub fn generate_scenes(out: &Path, spec: &SceneSpec) -> Result<Scenes, FixtureError> {
    let max = ObjectKind::ALL.len();
    if spec.classes > max {
        return Err(FixtureError::TooManyClasses { asked: spec.classes, max });
    }
    let mut files = Vec::new();
    const PREVIEW: usize = 4;
    let cell = (spec.side as f32 * 1.08).ceil() as u32 + 4;
    let mut preview =
        image::RgbImage::from_pixel(cell * PREVIEW as u32, cell * spec.classes as u32, image::Rgb([128; 3]));
    for (split, per_class, salt) in [("train", spec.train_per_class, 0u64), ("val", spec.val_per_class, 0x5ca1_ab1e)] {
        for (c, kind) in ObjectKind::ALL.iter().take(spec.classes).enumerate() {
            let dir = out.join(split).join(kind.name());
            fs::create_dir_all(&dir).map_err(|source| FixtureError::Io { path: dir.clone(), source })?;
            for n in 0..per_class {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(spec.seed ^ salt, 0x5ce_0000 + c as u64, n as u64));
                let jitter = |rng: &mut ChaCha8Rng| {
                    let s = spec.side as f32 * rng.random_range(0.92..1.08f32);
                    (s.round() as u32).max(16)
                };
                let (w, h) = (jitter(&mut rng), jitter(&mut rng));
                let (rgb, objects) = paint_scene(&mut rng, *kind, w, h, spec);
                let quality = rng.random_range(85..=95u8);
                if split == "train" && n < PREVIEW {
                    for y in 0..h {
                        for x in 0..w {
                            let i = ((y * w + x) * 3) as usize;
                            let px = image::Rgb([rgb[i], rgb[i + 1], rgb[i + 2]]);
                            preview.put_pixel(n as u32 * cell + 2 + x, c as u32 * cell + 2 + y, px);
                        }
                    }
                }
                let rel_path = format!("{0}/{0}_{n}.jpg", kind.name());
                let path = dir.join(format!("{}_{n}.jpg", kind.name()));
                let bytes = encode_rgb(&rgb, w, h, quality, |_| {})
                    .map_err(|message| FixtureError::Encode { path: path.clone(), message })?;
                write_file(&path, &bytes)?;
                files.push(SceneFile { split, rel_path, class: c, width: w, height: h, objects });
            }
        }
    }
    let mut tsv = String::from("split\tpath\tclass\tobjects\tsizes\n");
    for f in &files {
        let sizes: Vec<String> = f.objects.iter().map(|o| format!("{:.3}", o.size)).collect();
        let _ = writeln!(tsv, "{}\t{}\t{}\t{}\t{}", f.split, f.rel_path, f.class, f.objects.len(), sizes.join(","));
    }
    write_file(&out.join("scenes.tsv"), tsv.as_bytes())?;
    let mut png = Vec::new();
    let png_path = out.join("preview.png");
    preview
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| FixtureError::Encode { path: png_path.clone(), message: e.to_string() })?;
    write_file(&png_path, &png)?;
    Ok(Scenes { train_dir: out.join("train"), val_dir: out.join("val"), files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let spec = SceneSpec { train_per_class: 2, val_per_class: 1, side: 96, ..SceneSpec::default() };
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = generate_scenes(a.path(), &spec).unwrap();
        generate_scenes(b.path(), &spec).unwrap();
        let sc = generate_scenes(c.path(), &SceneSpec { seed: 1, ..spec.clone() }).unwrap();
        assert_eq!(sa.files.len(), 10 * 3);
        let read = |root: &Path, f: &SceneFile| fs::read(root.join(f.split).join(&f.rel_path)).unwrap();
        for (fa, fc) in sa.files.iter().zip(&sc.files) {
            assert_eq!(read(a.path(), fa), read(b.path(), fa), "{}", fa.rel_path);
            assert_ne!(read(a.path(), fa), read(c.path(), fc), "{}: another seed, same bytes", fa.rel_path);
        }
        assert_eq!(fs::read(a.path().join("scenes.tsv")).unwrap(), fs::read(b.path().join("scenes.tsv")).unwrap());
        // val images are not train images
        let train0 = sa.files.iter().find(|f| f.split == "train" && f.class == 0).unwrap();
        let val0 = sa.files.iter().find(|f| f.split == "val" && f.class == 0).unwrap();
        assert_ne!(read(a.path(), train0), read(a.path(), val0));
        let err = generate_scenes(c.path(), &SceneSpec { classes: 11, ..spec }).unwrap_err();
        assert!(matches!(err, FixtureError::TooManyClasses { asked: 11, max: 10 }), "{err}");
    }

    #[test]
    fn classes_are_balanced_and_objects_in_range() {
        let spec = SceneSpec::default();
        let mut per_class = [0usize; 10];
        let mut counts = [[0usize; 4]; 10];
        let mut size_sum = [0.0f32; 10];
        let mut n_obj = [0usize; 10];
        for (c, kind) in ObjectKind::ALL.iter().enumerate() {
            for n in 0..60u64 {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(9, c as u64, n));
                let (w, h) = (200, 180);
                let (px, objs) = paint_scene(&mut rng, *kind, w, h, &spec);
                assert_eq!(px.len(), (w * h * 3) as usize);
                per_class[c] += 1;
                assert!((1..=3).contains(&objs.len()), "{} objects", objs.len());
                counts[c][objs.len()] += 1;
                for o in &objs {
                    assert!((spec.min_size..=spec.max_size).contains(&o.size), "size {}", o.size);
                    // inside the image
                    assert!(o.cx - o.radius >= 0.0 && o.cx + o.radius <= w as f32, "{o:?}");
                    assert!(o.cy - o.radius >= 0.0 && o.cy + o.radius <= h as f32, "{o:?}");
                    // equal area: the shape's area is size² x side²
                    let area = kind.unit_area() * o.radius * o.radius;
                    let want = (o.size * 180.0).powi(2);
                    assert!((area - want).abs() < 1e-3 * want, "{}: {area} vs {want}", kind.name());
                    size_sum[c] += o.size;
                    n_obj[c] += 1;
                }
            }
        }
        assert!(per_class.iter().all(|&n| n == 60));
        // Counts and sizes are drawn alike for every class: every count occurs in every class,
        // and the mean size is near the middle of the range.
        for c in 0..10 {
            assert!(counts[c][1..].iter().all(|&k| k >= 8), "class {c}: counts {:?}", &counts[c][1..]);
            let mean = size_sum[c] / n_obj[c] as f32;
            assert!((mean - 0.165).abs() < 0.03, "class {c}: mean size {mean}");
        }
        // Generated set: the same number of files per class in each split.
        let dir = tempfile::tempdir().unwrap();
        let small = SceneSpec { train_per_class: 3, val_per_class: 2, side: 64, ..SceneSpec::default() };
        let s = generate_scenes(dir.path(), &small).unwrap();
        for kind in ObjectKind::ALL {
            for (split, want) in [("train", 3), ("val", 2)] {
                let n = fs::read_dir(dir.path().join(split).join(kind.name())).unwrap().count();
                assert_eq!(n, want, "{split}/{}", kind.name());
            }
        }
        assert_eq!(s.files.len(), 50);
    }

    #[test]
    fn shapes_fit_the_unit_disc_and_differ() {
        // Every shape lies within the unit disc (placement relies on it) and has a sizeable area.
        for kind in ObjectKind::ALL {
            for i in 0..200 {
                for j in 0..200 {
                    let (u, v) = (-1.2 + 2.4 * i as f32 / 199.0, -1.2 + 2.4 * j as f32 / 199.0);
                    if kind.inside(u, v) {
                        assert!(u * u + v * v <= 1.0 + 1e-4, "{} at ({u}, {v})", kind.name());
                    }
                }
            }
            assert!(kind.unit_area() > 0.5, "{}: area {}", kind.name(), kind.unit_area());
        }
        // Every shape is mirror-symmetric about an axis (the arrow and the crescent about u, the
        // star and the triangle about v): a flip of the image is a rotation of the shape, so
        // flipping keeps the class.
        for kind in ObjectKind::ALL {
            let sym = |f: &dyn Fn(f32, f32) -> (f32, f32)| {
                (0..60).all(|i| {
                    (0..60).all(|j| {
                        let (u, v) = (-1.0 + 2.0 * i as f32 / 59.0 + 0.0071, -1.0 + 2.0 * j as f32 / 59.0 + 0.013);
                        let (mu, mv) = f(u, v);
                        kind.inside(u, v) == kind.inside(mu, mv)
                    })
                })
            };
            assert!(sym(&|u, v| (u, -v)) || sym(&|u, v| (-u, v)), "{} has no mirror axis", kind.name());
        }
    }
}
