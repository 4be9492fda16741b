//! NGSI-LD geo-queries (ETSI GS CIM 009 §4.10): `georel` (`near;maxDistance==m`,
//! `near;minDistance==m`, `within`, `contains`, `intersects`, `disjoint`, `equals`) with a
//! `geometry` (`Point` or `Polygon`) and its GeoJSON `coordinates`, matched against an
//! entity's GeoProperty. Coordinates are `[longitude, latitude]` on WGS84; distances are
//! great-circle distances in metres on a sphere of the Earth's mean radius (haversine), which is
//! within 0.5% of the ellipsoid — good for "car parks within 500 m", not for surveying.
//!
//! Entity locations are matched when they are Points (what sensors and car parks send); an
//! entity whose location is another geometry, or not set, matches no geo-query.

use serde_json::Value;

/// Mean radius of the Earth, metres (IUGG).
const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Vertices of a query polygon at most.
pub const POLYGON_VERTICES_MAX: usize = 10_000;

/// The geometry of a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Geometry {
    /// `[lon, lat]`.
    Point(f64, f64),
    /// The outer ring, `[lon, lat]` vertices (closed or not), and any holes.
    Polygon(Vec<Vec<(f64, f64)>>),
}

/// A relation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Relation {
    /// Within `max` metres of the point.
    NearMax(f64),
    /// At least `min` metres from the point.
    NearMin(f64),
    /// Inside the polygon (or at the point).
    Within,
    /// Shares a point with the geometry.
    Intersects,
    /// Shares no point with the geometry.
    Disjoint,
    /// The same point.
    Equals,
}

/// A parsed geo-query.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoQuery {
    /// The relation.
    pub relation: Relation,
    /// The query geometry.
    pub geometry: Geometry,
    /// The GeoProperty matched (default `location`).
    pub property: String,
}

/// Parses `georel`, `geometry`, `coordinates` and `geoproperty`; the error says what to send.
pub fn parse(
    georel: &str,
    geometry: &str,
    coordinates: &str,
    geoproperty: Option<&str>,
) -> Result<GeoQuery, String> {
    let coords: Value = serde_json::from_str(coordinates).map_err(|_| {
        format!("coordinates {coordinates} is not a JSON array, e.g. [120.16,30.27]")
    })?;
    let geometry = match geometry {
        "Point" => {
            let (x, y) = position(&coords)?;
            Geometry::Point(x, y)
        }
        "Polygon" => {
            let rings = coords
                .as_array()
                .filter(|r| !r.is_empty())
                .ok_or("a Polygon's coordinates are rings: [[[lon,lat],[lon,lat],…]]")?;
            let mut out = Vec::new();
            let mut n = 0;
            for ring in rings {
                let pts = ring
                    .as_array()
                    .ok_or("a Polygon's ring is an array of [lon,lat] positions")?;
                n += pts.len();
                if n > POLYGON_VERTICES_MAX {
                    return Err(format!(
                        "a query polygon has at most {POLYGON_VERTICES_MAX} vertices"
                    ));
                }
                let ring: Vec<(f64, f64)> = pts.iter().map(position).collect::<Result<_, _>>()?;
                if ring.len() < 3 {
                    return Err("a Polygon's ring needs at least 3 positions".into());
                }
                out.push(ring);
            }
            Geometry::Polygon(out)
        }
        other => {
            return Err(format!(
                "geometry {other} is not served: use Point or Polygon"
            ));
        }
    };
    let mut parts = georel.split(';');
    let rel = parts.next().unwrap_or("");
    let modifier = parts.next();
    if parts.next().is_some() {
        return Err(format!("georel {georel} has more than one modifier"));
    }
    let distance = |m: &str, key: &str| -> Result<f64, String> {
        let v = m
            .strip_prefix(key)
            .and_then(|v| v.strip_prefix("=="))
            .ok_or_else(|| {
                format!("near takes maxDistance==metres or minDistance==metres, not {m}")
            })?;
        let d: f64 = v
            .parse()
            .map_err(|_| format!("{key} {v} is not a number of metres"))?;
        if !(d.is_finite() && d >= 0.0) {
            return Err(format!("{key} must be 0 or more metres"));
        }
        Ok(d)
    };
    let relation = match (rel, modifier) {
        ("near", Some(m)) if m.starts_with("maxDistance") => {
            Relation::NearMax(distance(m, "maxDistance")?)
        }
        ("near", Some(m)) if m.starts_with("minDistance") => {
            Relation::NearMin(distance(m, "minDistance")?)
        }
        ("near", _) => return Err("near needs a distance: georel=near;maxDistance==500".into()),
        ("within", None) => Relation::Within,
        ("contains" | "intersects", None) => Relation::Intersects,
        ("disjoint", None) => Relation::Disjoint,
        ("equals", None) => Relation::Equals,
        _ => {
            return Err(format!(
                "georel {georel} is not one of near;maxDistance==m, near;minDistance==m, within, contains, intersects, disjoint, equals"
            ));
        }
    };
    if matches!(relation, Relation::NearMax(_) | Relation::NearMin(_))
        && !matches!(geometry, Geometry::Point(..))
    {
        return Err("near is measured from a Point: geometry=Point".into());
    }
    Ok(GeoQuery {
        relation,
        geometry,
        property: geoproperty.unwrap_or("location").to_string(),
    })
}

fn position(v: &Value) -> Result<(f64, f64), String> {
    let a = v.as_array().ok_or("a position is [longitude, latitude]")?;
    let (Some(x), Some(y)) = (
        a.first().and_then(Value::as_f64),
        a.get(1).and_then(Value::as_f64),
    ) else {
        return Err("a position is [longitude, latitude], two numbers".into());
    };
    if !(-180.0..=180.0).contains(&x) || !(-90.0..=90.0).contains(&y) {
        return Err(format!("[{x}, {y}] is not a longitude and a latitude"));
    }
    Ok((x, y))
}

/// The point of an entity's GeoJSON location, if it is a Point.
pub fn point_of(geojson: &str) -> Option<(f64, f64)> {
    let v: Value = serde_json::from_str(geojson).ok()?;
    if v.get("type")?.as_str()? != "Point" {
        return None;
    }
    position(v.get("coordinates")?).ok()
}

/// Great-circle distance in metres between two `[lon, lat]` points.
pub fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lon1, lat1) = (a.0.to_radians(), a.1.to_radians());
    let (lon2, lat2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Whether `p` is inside `ring` (even-odd rule; points on an edge count as inside).
fn in_ring(p: (f64, f64), ring: &[(f64, f64)]) -> bool {
    if on_edge(p, ring) {
        return true;
    }
    let mut inside = false;
    let n = ring.len();
    for i in 0..n {
        let (a, b) = (ring[i], ring[(i + n - 1) % n]);
        if (a.1 > p.1) != (b.1 > p.1) && p.0 < (b.0 - a.0) * (p.1 - a.1) / (b.1 - a.1) + a.0 {
            inside = !inside;
        }
    }
    inside
}

fn in_polygon(p: (f64, f64), rings: &[Vec<(f64, f64)>]) -> bool {
    match rings.split_first() {
        Some((outer, holes)) => {
            in_ring(p, outer) && !holes.iter().any(|h| in_ring(p, h) && !on_edge(p, h))
        }
        None => false,
    }
}

fn on_edge(p: (f64, f64), ring: &[(f64, f64)]) -> bool {
    let n = ring.len();
    (0..n).any(|i| {
        let (a, b) = (ring[i], ring[(i + 1) % n]);
        let cross = (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0);
        cross.abs() < 1e-12
            && p.0 >= a.0.min(b.0)
            && p.0 <= a.0.max(b.0)
            && p.1 >= a.1.min(b.1)
            && p.1 <= a.1.max(b.1)
    })
}

impl GeoQuery {
    /// Whether an entity at `p` matches.
    pub fn matches(&self, p: (f64, f64)) -> bool {
        let same = |q: (f64, f64)| (p.0 - q.0).abs() < 1e-9 && (p.1 - q.1).abs() < 1e-9;
        let touches = match &self.geometry {
            Geometry::Point(x, y) => same((*x, *y)),
            Geometry::Polygon(rings) => in_polygon(p, rings),
        };
        match (self.relation, &self.geometry) {
            (Relation::NearMax(m), Geometry::Point(x, y)) => distance_m(p, (*x, *y)) <= m,
            (Relation::NearMin(m), Geometry::Point(x, y)) => distance_m(p, (*x, *y)) >= m,
            (Relation::NearMax(_) | Relation::NearMin(_), _) => false,
            (Relation::Within | Relation::Intersects, _) => touches,
            (Relation::Disjoint, _) => !touches,
            (Relation::Equals, Geometry::Point(x, y)) => same((*x, *y)),
            (Relation::Equals, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_are_great_circles() {
        // 0.0592° of longitude and 0.032° of latitude at 30.27° N: 5.69 km east and 3.56 km
        // north, 6.71 km as the crow flies.
        let d = distance_m((120.1535, 30.2590), (120.2127, 30.2910));
        assert!((6_650.0..6_760.0).contains(&d), "{d}");
        // One degree of latitude: 111.2 km.
        let d = distance_m((120.0, 30.0), (120.0, 31.0));
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
        assert_eq!(distance_m((1.0, 2.0), (1.0, 2.0)), 0.0);
    }

    #[test]
    fn relations_match_as_the_spec_says() {
        let near = parse("near;maxDistance==500", "Point", "[120.16,30.27]", None).unwrap();
        assert!(near.matches((120.162, 30.271)));
        assert!(!near.matches((120.17, 30.28)));
        let far = parse("near;minDistance==500", "Point", "[120.16,30.27]", None).unwrap();
        assert!(far.matches((120.17, 30.28)) && !far.matches((120.16, 30.27)));
        let square = "[[[120.0,30.0],[121.0,30.0],[121.0,31.0],[120.0,31.0],[120.0,30.0]]]";
        let within = parse("within", "Polygon", square, Some("location")).unwrap();
        assert!(within.matches((120.5, 30.5)));
        assert!(within.matches((120.0, 30.5)), "on the edge");
        assert!(!within.matches((121.5, 30.5)));
        let disjoint = parse("disjoint", "Polygon", square, None).unwrap();
        assert!(disjoint.matches((121.5, 30.5)) && !disjoint.matches((120.5, 30.5)));
        let holed = "[[[120.0,30.0],[121.0,30.0],[121.0,31.0],[120.0,31.0]],[[120.4,30.4],[120.6,30.4],[120.6,30.6],[120.4,30.6]]]";
        let q = parse("intersects", "Polygon", holed, None).unwrap();
        assert!(!q.matches((120.5, 30.5)) && q.matches((120.2, 30.2)));
        let eq = parse("equals", "Point", "[1,2]", None).unwrap();
        assert!(eq.matches((1.0, 2.0)) && !eq.matches((1.0, 2.1)));
        assert_eq!(
            point_of(r#"{"type":"Point","coordinates":[120.1,30.2]}"#),
            Some((120.1, 30.2))
        );
        assert_eq!(
            point_of(r#"{"type":"LineString","coordinates":[[1,2],[3,4]]}"#),
            None
        );
    }

    #[test]
    fn bad_queries_say_what_to_send() {
        for (rel, geo, coords, want) in [
            ("near", "Point", "[1,2]", "near needs a distance"),
            ("near;maxDistance==x", "Point", "[1,2]", "is not a number"),
            (
                "near;maxDistance==5",
                "Polygon",
                "[[[0,0],[1,0],[1,1]]]",
                "measured from a Point",
            ),
            ("overlaps", "Point", "[1,2]", "is not one of"),
            (
                "within",
                "LineString",
                "[[1,2],[3,4]]",
                "use Point or Polygon",
            ),
            ("within", "Point", "[200,2]", "not a longitude"),
            ("within", "Polygon", "[[[0,0],[1,0]]]", "at least 3"),
            ("within", "Point", "1,2", "not a JSON array"),
        ] {
            let e = parse(rel, geo, coords, None).unwrap_err();
            assert!(e.contains(want), "{rel} {geo} {coords}: {e}");
        }
    }
}
