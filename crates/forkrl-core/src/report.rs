//! Writing results: atomic file writes and a line chart drawn as SVG and as PNG (used by the simulator and the
//! trainer).

use std::{fmt::Write as _, io, path::Path};

/// Writes `contents` to `path` atomically and durably: a temporary file in the same folder, flushed to disk (`fsync`),
/// then renamed over `path`, and the folder flushed, so that neither a reader nor a power loss ever sees a half-written
/// file (the old contents or the new, nothing between).
///
/// # Errors
/// The I/O error of the write, the flush or the rename.
pub fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    write_atomic_bytes(path, contents.as_bytes())
}

/// [`write_atomic`] for bytes.
///
/// # Errors
/// As [`write_atomic`].
pub fn write_atomic_bytes(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent())
}

/// Flushes a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened (Windows).
///
/// # Errors
/// The I/O error of the flush.
pub fn sync_dir(dir: Option<&Path>) -> io::Result<()> {
    let dir = match dir {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if cfg!(unix) { std::fs::File::open(dir)?.sync_all() } else { Ok(()) }
}

/// One line of a chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points, in order.
    pub points: Vec<(f64, f64)>,
    /// An interval drawn as a shaded band around the line: `(x, low, high)` points, in order (empty: none).
    pub band: Vec<(f64, f64, f64)>,
}

impl Series {
    /// A line without a band.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, band: Vec::new() }
    }
}

/// One panel: a title, an x-axis label, the y values drawn at the bottom and top edges (values are clipped to
/// `[y_min, y_max]`; a line marks y = 0 when it is inside) and lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// y at the bottom edge.
    pub y_min: f64,
    /// y at the top edge.
    pub y_max: f64,
    /// The lines.
    pub series: Vec<Series>,
}

const COLOURS: [[u8; 3]; 6] = [
    [0x1f, 0x77, 0xb4],
    [0xd6, 0x27, 0x28],
    [0x2c, 0xa0, 0x2c],
    [0xff, 0x7f, 0x0e],
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
];
/// Opacity of a confidence band (overlapping bands stay readable).
const BAND_OPACITY: f64 = 0.15;
const FRAME: [u8; 3] = [0x88, 0x88, 0x88];
const INK: [u8; 3] = [0, 0, 0];

fn hex([r, g, b]: [u8; 3]) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// Where a text's `x` is: its start, its middle or its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    Start,
    Middle,
    End,
}

/// What a chart is drawn from: the same list renders to SVG ([`line_chart_svg`]) and to PNG ([`line_chart_png`]).
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Text {
        x: f64,
        y: f64,
        anchor: Anchor,
        colour: [u8; 3],
        text: String,
    },
    Frame {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
    },
    Line {
        colour: [u8; 3],
        width: f64,
        points: Vec<(f64, f64)>,
    },
    /// A closed polygon filled with the colour at [`BAND_OPACITY`].
    Band {
        colour: [u8; 3],
        points: Vec<(f64, f64)>,
    },
}

fn finite_band(band: &[(f64, f64, f64)]) -> impl DoubleEndedIterator<Item = &(f64, f64, f64)> {
    band.iter().filter(|b| b.0.is_finite() && b.1.is_finite() && b.2.is_finite())
}

/// The chart's size and shapes in pixel coordinates: panels side by side, each with its own x range (from its points
/// and bands) and a legend.
fn layout(panels: &[Panel]) -> (f64, f64, Vec<Shape>) {
    let (pad, pw, ph) = (50.0, 400.0, 250.0);
    let width = pad + panels.len().max(1) as f64 * (pw + pad);
    let height = ph + 2.0 * pad + 20.0;
    let mut shapes = Vec::new();
    for (k, panel) in panels.iter().enumerate() {
        let x0 = pad + k as f64 * (pw + pad);
        let xs = panel.series.iter().flat_map(|l| l.points.iter().map(|p| p.0).chain(l.band.iter().map(|b| b.0)));
        let (lo, hi) =
            xs.filter(|x| x.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let bottom = if panel.y_min.is_finite() { panel.y_min } else { 0.0 };
        let top = if panel.y_max.is_finite() && panel.y_max > bottom { panel.y_max } else { bottom + 1.0 };
        let to_px = |x: f64, y: f64| {
            (x0 + pw * (x - lo) / span, pad + ph * (1.0 - ((y - bottom) / (top - bottom)).clamp(0.0, 1.0)))
        };
        let text = |x, y, anchor, colour, text: &str| Shape::Text { x, y, anchor, colour, text: text.to_string() };
        shapes.push(text(x0 + pw / 2.0, pad - 10.0, Anchor::Middle, INK, &panel.title));
        shapes.push(Shape::Frame { x: x0, y: pad, w: pw, h: ph });
        shapes.push(text(x0 + pw / 2.0, pad + ph + 16.0, Anchor::Middle, INK, &panel.x_label));
        let y_tick = |y: f64| if y == 0.0 { "0".to_string() } else { format!("{y:.2}") };
        for (tick, label) in [(0.0, y_tick(bottom)), (1.0, y_tick(top))] {
            shapes.push(text(x0 - 4.0, pad + ph * (1.0 - tick) + 4.0, Anchor::End, INK, &label));
        }
        if bottom < 0.0 && top > 0.0 {
            let zero = pad + ph * top / (top - bottom);
            shapes.push(Shape::Line { colour: FRAME, width: 1.0, points: vec![(x0, zero), (x0 + pw, zero)] });
            shapes.push(text(x0 - 4.0, zero + 4.0, Anchor::End, INK, "0"));
        }
        if lo.is_finite() && hi.is_finite() {
            let tick = |x: f64| if x.fract() == 0.0 && x.abs() < 1e9 { format!("{x:.0}") } else { format!("{x:.2}") };
            shapes.push(text(x0, pad + ph + 16.0, Anchor::Start, INK, &tick(lo)));
            shapes.push(text(x0 + pw, pad + ph + 16.0, Anchor::End, INK, &tick(hi)));
        }
        for (j, line) in panel.series.iter().enumerate() {
            let colour = COLOURS[j % COLOURS.len()];
            let band: Vec<&(f64, f64, f64)> = finite_band(&line.band).collect();
            if band.len() > 1 {
                let upper = band.iter().map(|b| to_px(b.0, b.2));
                let lower = band.iter().rev().map(|b| to_px(b.0, b.1));
                shapes.push(Shape::Band { colour, points: upper.chain(lower).collect() });
            }
            shapes.push(text(x0 + 6.0, pad + 14.0 + 14.0 * j as f64, Anchor::Start, colour, &line.name));
            let points =
                line.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).map(|&(x, y)| to_px(x, y)).collect();
            shapes.push(Shape::Line { colour, width: 2.0, points });
        }
    }
    (width, height, shapes)
}

/// Escapes the characters XML gives a meaning to.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn svg_points(points: &[(f64, f64)]) -> String {
    points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect::<Vec<_>>().join(" ")
}

/// Panels side by side in one SVG document, each with its own x range (from its points) and a legend; a series'
/// band is a shaded area behind its line.
pub fn line_chart_svg(panels: &[Panel]) -> String {
    let (width, height, shapes) = layout(panels);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for shape in shapes {
        let _ = match shape {
            Shape::Text { x, y, anchor, colour, text } => {
                let anchor = match anchor {
                    Anchor::Start => String::new(),
                    Anchor::Middle => " text-anchor=\"middle\"".into(),
                    Anchor::End => " text-anchor=\"end\"".into(),
                };
                let fill = if colour == INK { String::new() } else { format!(" fill=\"{}\"", hex(colour)) };
                writeln!(s, "<text x=\"{x}\" y=\"{y}\"{anchor}{fill}>{}</text>", xml_escape(&text))
            }
            Shape::Frame { x, y, w, h } => writeln!(
                s,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"{}\"/>",
                hex(FRAME)
            ),
            Shape::Line { colour, width, points } => writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\" points=\"{}\"/>",
                hex(colour),
                svg_points(&points)
            ),
            Shape::Band { colour, points } => writeln!(
                s,
                "<polygon fill=\"{}\" fill-opacity=\"{BAND_OPACITY}\" stroke=\"none\" points=\"{}\"/>",
                hex(colour),
                svg_points(&points)
            ),
        };
    }
    s.push_str("</svg>\n");
    s
}

/// An RGB raster with alpha blending, for [`line_chart_png`].
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn blend(&mut self, x: i64, y: i64, colour: [u8; 3], alpha: f64) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let i = 3 * (y as usize * self.w + x as usize);
        for (c, &v) in colour.iter().enumerate() {
            let old = f64::from(self.rgb[i + c]);
            self.rgb[i + c] = (old + alpha * (f64::from(v) - old)).round() as u8;
        }
    }

    /// A segment `width` pixels wide: a filled disc stamped every half pixel along it.
    fn segment(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), colour: [u8; 3], width: f64) {
        let n = ((x1 - x0).hypot(y1 - y0) * 2.0).ceil().max(1.0) as usize;
        let r = width / 2.0;
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (cx, cy) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            for y in (cy - r).floor() as i64..=(cy + r).ceil() as i64 {
                for x in (cx - r).floor() as i64..=(cx + r).ceil() as i64 {
                    if (x as f64 + 0.5 - cx).hypot(y as f64 + 0.5 - cy) <= r + 0.25 {
                        self.blend(x, y, colour, 1.0);
                    }
                }
            }
        }
    }

    /// Even-odd scanline fill of a polygon, sampled at pixel centres.
    fn polygon(&mut self, points: &[(f64, f64)], colour: [u8; 3], alpha: f64) {
        let (top, bottom) =
            points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if !(top.is_finite() && bottom.is_finite()) {
            return;
        }
        for y in top.floor().max(0.0) as i64..=bottom.ceil().min(self.h as f64) as i64 {
            let yc = y as f64 + 0.5;
            let mut xs: Vec<f64> = Vec::new();
            for (i, &(xa, ya)) in points.iter().enumerate() {
                let (xb, yb) = points[(i + 1) % points.len()];
                if (ya <= yc) != (yb <= yc) {
                    xs.push(xa + (yc - ya) * (xb - xa) / (yb - ya));
                }
            }
            xs.sort_by(f64::total_cmp);
            for pair in xs.chunks_exact(2) {
                for x in (pair[0] - 0.5).ceil() as i64..=(pair[1] - 0.5).floor() as i64 {
                    self.blend(x, y, colour, alpha);
                }
            }
        }
    }

    /// Text in the 8×8 public-domain bitmap font of `font8x8` (ASCII; other characters as `?`), baseline at `y`.
    fn text(&mut self, x: f64, y: f64, anchor: Anchor, colour: [u8; 3], text: &str) {
        let advance = 7.0;
        let width = advance * text.chars().count() as f64;
        let left = match anchor {
            Anchor::Start => x,
            Anchor::Middle => x - width / 2.0,
            Anchor::End => x - width,
        };
        for (k, c) in text.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[if c.is_ascii() { c as usize } else { '?' as usize }];
            let gx = (left + advance * k as f64).round() as i64;
            let gy = (y - 8.0).round() as i64;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.blend(gx + col, gy + row as i64, colour, 1.0);
                    }
                }
            }
        }
    }
}

/// The chart of [`line_chart_svg`] as a PNG image (8-bit RGB, same size in pixels), drawn by our own rasteriser:
/// 2-pixel lines, bands at 15 % opacity and an 8×8 bitmap font (so no font or image library is needed at run time).
///
/// # Errors
/// The PNG encoder's error, as an I/O error.
pub fn line_chart_png(panels: &[Panel]) -> io::Result<Vec<u8>> {
    let (width, height, shapes) = layout(panels);
    let (w, h) = (width.ceil() as usize, height.ceil() as usize);
    let mut canvas = Canvas { w, h, rgb: vec![255; 3 * w * h] };
    for shape in shapes {
        match shape {
            Shape::Text { x, y, anchor, colour, text } => canvas.text(x, y, anchor, colour, &text),
            Shape::Frame { x, y, w, h } => {
                let corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)];
                for pair in corners.windows(2) {
                    canvas.segment(pair[0], pair[1], FRAME, 1.0);
                }
            }
            Shape::Line { colour, width, points } => {
                for pair in points.windows(2) {
                    canvas.segment(pair[0], pair[1], colour, width);
                }
            }
            Shape::Band { colour, points } => canvas.polygon(&points, colour, BAND_OPACITY),
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer.write_image_data(&canvas.rgb).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_and_atomic_write() {
        let panel = Panel {
            title: "t".into(),
            x_label: "step".into(),
            y_max: 1.0,
            y_min: 0.0,
            series: vec![Series::new("a", vec![(0.0, 0.0), (1.0, 0.5), (2.0, f64::NAN)])],
        };
        let svg = line_chart_svg(&[panel.clone(), panel]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("50.0,300.0 250.0,175.0\""), "{svg}");
        let dir = std::env::temp_dir().join(format!("forkrl-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("x.json");
        write_atomic(&path, "{}").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{}");
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    fn decode(png: &[u8]) -> (usize, usize, Vec<u8>) {
        let mut reader = png::Decoder::new(io::Cursor::new(png)).read_info().expect("a PNG");
        let mut rgb = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut rgb).expect("one frame");
        assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
        (info.width as usize, info.height as usize, rgb)
    }

    #[test]
    fn the_png_draws_what_the_svg_draws() {
        let mut line = Series::new("mean", vec![(0.0, 0.0), (1.0, 1.0)]);
        line.band = vec![(0.0, 0.2, 0.4), (1.0, 0.2, 0.4), (1.0, f64::NAN, 1.0)];
        let panels = [Panel { title: "T".into(), x_label: "step".into(), y_min: 0.0, y_max: 1.0, series: vec![line] }];
        let svg = line_chart_svg(&panels);
        // The band: upper edge left to right, then the lower edge back (pixels: y = 300 − 250·value).
        assert!(
            svg.contains(
                "fill-opacity=\"0.15\" stroke=\"none\" points=\"50.0,200.0 450.0,200.0 450.0,250.0 50.0,250.0\""
            ),
            "{svg}"
        );
        let (w, h, rgb) = decode(&line_chart_png(&panels).expect("encodes"));
        assert_eq!((w, h), (500, 370), "the SVG's size");
        let px = |x: usize, y: usize| [rgb[3 * (y * w + x)], rgb[3 * (y * w + x) + 1], rgb[3 * (y * w + x) + 2]];
        let blue = COLOURS[0];
        // On the line (its middle is (250, 175)), off it, and inside the band (15 % of the colour over white).
        assert_eq!(px(250, 175), blue);
        assert_eq!(px(300, 280), [255; 3]);
        let tint = blue.map(|c| (255.0 + BAND_OPACITY * (f64::from(c) - 255.0)).round() as u8);
        assert_eq!(px(100, 225), tint);
        // The frame's corner and some ink in the title's row.
        assert_eq!(px(50, 50), FRAME);
        assert!((30..=40).any(|y| (240..=260).any(|x| px(x, y) == INK)), "the title is drawn");
    }

    #[test]
    fn text_is_escaped_and_odd_points_are_dropped() {
        let panel = Panel {
            title: "a < b & c".into(),
            x_label: "ρ".into(),
            y_max: 0.0,
            y_min: 0.0,
            series: vec![Series::new("x", vec![(f64::NAN, 1.0), (f64::INFINITY, 0.0)])],
        };
        let svg = line_chart_svg(std::slice::from_ref(&panel));
        assert!(svg.contains("a &lt; b &amp; c") && svg.contains("points=\"\""), "{svg}");
        let png = line_chart_png(&[panel]).expect("non-ASCII and non-finite input still draws");
        assert_eq!(decode(&png).0, 500);
        // A panel below zero: y_min at the bottom edge, a line at y = 0 (pixel 175, half-way down).
        let gain = Panel {
            title: "g".into(),
            x_label: "s".into(),
            y_min: -0.5,
            y_max: 0.5,
            series: vec![Series::new("d", vec![(0.0, -0.5), (1.0, 0.0)])],
        };
        let svg = line_chart_svg(std::slice::from_ref(&gain));
        assert!(svg.contains("stroke-width=\"2\" points=\"50.0,300.0 450.0,175.0\""), "{svg}");
        assert!(svg.contains("stroke-width=\"1\" points=\"50.0,175.0 450.0,175.0\""), "{svg}");
        assert!(svg.contains(">-0.50</text>"), "{svg}");
        let png = line_chart_png(&[gain]).expect("draws");
        assert_eq!(decode(&png).0, 500);
    }
}
