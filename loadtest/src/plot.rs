//! A dependency-free SVG line chart of the loadtest time series (one panel per series).

use std::fmt::Write;

/// One named series of (t seconds, value) points.
pub(crate) struct Series<'a> {
    pub(crate) name: &'a str,
    pub(crate) points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 720.0;
const PANEL_H: f64 = 160.0;
const MARGIN_L: f64 = 70.0;
const MARGIN_R: f64 = 20.0;
const GAP: f64 = 40.0;

/// Render `series` as stacked panels sharing the time axis.
pub(crate) fn svg(title: &str, series: &[Series<'_>]) -> String {
    let height = GAP + series.len() as f64 * (PANEL_H + GAP);
    let t_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{MARGIN_L}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (i, s) in series.iter().enumerate() {
        let top = GAP + i as f64 * (PANEL_H + GAP);
        let bottom = top + PANEL_H;
        let v_max = s
            .points
            .iter()
            .map(|p| p.1)
            .fold(0.0_f64, f64::max)
            .max(1.0);
        let x = |t: f64| MARGIN_L + t / t_max * (WIDTH - MARGIN_L - MARGIN_R);
        let y = |v: f64| bottom - v / v_max * PANEL_H;
        let _ = writeln!(
            out,
            r#"<line x1="{MARGIN_L}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/><line x1="{MARGIN_L}" y1="{top}" x2="{MARGIN_L}" y2="{bottom}" stroke="black"/>"#,
            WIDTH - MARGIN_R
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{}</text><text x="5" y="{}">{v_max:.0}</text><text x="5" y="{bottom}">0</text><text x="{}" y="{}">{t_max:.0} s</text>"#,
            MARGIN_L + 5.0,
            top - 5.0,
            escape(s.name),
            top + 10.0,
            WIDTH - MARGIN_R - 30.0,
            bottom + 15.0
        );
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_panels() {
        let s = svg(
            "a<b",
            &[
                Series {
                    name: "viewers",
                    points: vec![(0.0, 0.0), (1.0, 10.0)],
                },
                Series {
                    name: "packets/s",
                    points: vec![],
                },
            ],
        );
        assert!(s.starts_with("<svg"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("a&lt;b"));
    }
}
