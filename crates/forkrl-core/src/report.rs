//! Writing results: atomic file writes and a dependency-free SVG line chart (used by the simulator and the trainer).

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
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points, in order.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, an x-axis label, the y value drawn at the top (values are clipped to `[0, y_max]`) and lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// y at the top edge.
    pub y_max: f64,
    /// The lines.
    pub series: Vec<Series>,
}

const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// Panels side by side in one SVG document, each with its own x range (from its points) and a legend.
pub fn line_chart_svg(panels: &[Panel]) -> String {
    let (pad, pw, ph) = (50.0, 400.0, 250.0);
    let width = pad + panels.len().max(1) as f64 * (pw + pad);
    let height = ph + 2.0 * pad + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (k, panel) in panels.iter().enumerate() {
        let x0 = pad + k as f64 * (pw + pad);
        let xs = panel.series.iter().flat_map(|l| l.points.iter().map(|p| p.0));
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let top = if panel.y_max > 0.0 { panel.y_max } else { 1.0 };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x0 + pw / 2.0,
            pad - 10.0,
            panel.title
        );
        let _ =
            writeln!(s, "<rect x=\"{x0}\" y=\"{pad}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>");
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x0 + pw / 2.0,
            pad + ph + 16.0,
            panel.x_label
        );
        for (tick, label) in [(0.0, "0".to_string()), (1.0, format!("{top:.2}"))] {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>",
                x0 - 4.0,
                pad + ph * (1.0 - tick) + 4.0
            );
        }
        for (j, line) in panel.series.iter().enumerate() {
            let colour = COLOURS[j % COLOURS.len()];
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>",
                x0 + 6.0,
                pad + 14.0 + 14.0 * j as f64,
                line.name
            );
            let pts: Vec<String> = line
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(x, y)| {
                    format!("{:.1},{:.1}", x0 + pw * (x - lo) / span, pad + ph * (1.0 - (y / top).clamp(0.0, 1.0)))
                })
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            );
        }
    }
    s.push_str("</svg>\n");
    s
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
            series: vec![Series { name: "a".into(), points: vec![(0.0, 0.0), (1.0, 0.5), (2.0, f64::NAN)] }],
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
}
