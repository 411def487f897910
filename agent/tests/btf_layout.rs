//! Every layout the kernel and the agent share, checked against the compiled objects'
//! BTF: each C struct's size, and each member's offset and size, must equal the Rust
//! mirror's (`hitless_agent::abi`). A field reordered, resized, added or removed on one
//! side only fails here, naming the struct and the field. `cargo xtask ebpf --check`
//! runs this test, as Cilium's alignchecker does for Go.
//!
//! The BTF reader is small on purpose: it knows the type kinds clang emits for these
//! objects and resolves member sizes through typedefs, qualifiers and arrays.

use std::collections::BTreeMap;
use std::mem::size_of;

use hitless_agent::abi::{Backend, BackendStats, Counters, Endpoint, Frontend, Meta, Rev, RevKey, Service, SlotKey};

/// A struct as one side lays it out: total size and (member, offset, size).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    size: usize,
    members: Vec<(String, usize, usize)>,
}

/// The size of a field, from a projection (no value needed).
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

macro_rules! rust_layout {
    ($c:literal, $t:ty, [$($f:ident),* $(,)?]) => {
        ($c, Layout {
            size: size_of::<$t>(),
            members: vec![$((stringify!($f).to_owned(), std::mem::offset_of!($t, $f), field_size(|s: &$t| &s.$f))),*],
        })
    };
}

/// The Rust mirrors, by C struct name.
fn rust_layouts() -> Vec<(&'static str, Layout)> {
    vec![
        rust_layout!("hl_endpoint", Endpoint, [addr, port, proto, pad]),
        rust_layout!("hl_frontend", Frontend, [service_id, flags]),
        rust_layout!("hl_service", Service, [gen, slots4, slots6, policy, pad]),
        rust_layout!("hl_slot_key", SlotKey, [service_id, slot, table, gen]),
        rust_layout!("hl_backend", Backend, [addr, port, state, family, service_id]),
        rust_layout!("hl_rev_key", RevKey, [cookie, addr, port, pad0, pad1]),
        rust_layout!("hl_rev", Rev, [addr, port, pad]),
        rust_layout!("hl_counters", Counters, [steered, redirected, refused, passed_draining]),
        rust_layout!(
            "hl_backend_stats",
            BackendStats,
            [connects, failed, closed, retrans, bytes_in, bytes_out, srtt_us_sum, latency_us_sum, latency, resets]
        ),
        rust_layout!("hl_meta", Meta, [revision, applied_at_ns]),
    ]
}

// BTF type kinds (include/uapi/linux/btf.h).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Type {
    name: String,
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// ARRAY: (element type, count).
    array: Option<(u32, u32)>,
    /// STRUCT/UNION: (name, type, bit offset).
    members: Vec<(String, u32, u32)>,
}

/// The types of a raw `.BTF` section, indexed by type id (id 0 is void).
fn parse_btf(data: &[u8]) -> Vec<Type> {
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    assert_eq!(u16_at(0), 0xeb9f, "not little-endian BTF");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let str_off = u32_at(16) as usize;
    let strings = &data[hdr_len + str_off..];
    let name = |off: u32| {
        let s = &strings[off as usize..];
        String::from_utf8_lossy(&s[..s.iter().position(|b| *b == 0).unwrap_or(s.len())]).into_owned()
    };
    let mut types = vec![Type {
        name: "void".into(),
        kind: 0,
        kind_flag: false,
        size_or_type: 0,
        array: None,
        members: Vec::new(),
    }];
    let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    while o < end {
        let info = u32_at(o + 4);
        let (vlen, kind, kind_flag) = ((info & 0xffff) as usize, (info >> 24) & 0x1f, info >> 31 == 1);
        let mut t = Type {
            name: name(u32_at(o)),
            kind,
            kind_flag,
            size_or_type: u32_at(o + 8),
            array: None,
            members: Vec::new(),
        };
        o += 12;
        match kind {
            INT | VAR | DECL_TAG => o += 4,
            ARRAY => {
                t.array = Some((u32_at(o), u32_at(o + 8)));
                o += 12;
            }
            STRUCT | UNION => {
                for _ in 0..vlen {
                    t.members.push((name(u32_at(o)), u32_at(o + 4), u32_at(o + 8)));
                    o += 12;
                }
            }
            ENUM | FUNC_PROTO => o += 8 * vlen,
            DATASEC | ENUM64 => o += 12 * vlen,
            _ => {}
        }
        types.push(t);
    }
    types
}

/// The size in bytes of type `id`.
fn size_of_type(types: &[Type], id: u32) -> usize {
    let t = &types[id as usize];
    match t.kind {
        INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT => t.size_or_type as usize,
        PTR => 8,
        ARRAY => {
            let (elem, n) = t.array.expect("array info");
            size_of_type(types, elem) * n as usize
        }
        TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => size_of_type(types, t.size_or_type),
        k => panic!("BTF type {} of kind {k} has no size", t.name),
    }
}

/// Every struct of the object's BTF, by name.
fn c_layouts(object: &std::path::Path) -> BTreeMap<String, Layout> {
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(object).unwrap_or_else(|e| panic!("reading {}: {e}", object.display()));
    let file = object::File::parse(&*bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", object.display()));
    let section = file.section_by_name(".BTF").unwrap_or_else(|| panic!("{} has no .BTF section", object.display()));
    let types = parse_btf(section.data().expect(".BTF data"));
    types
        .iter()
        .filter(|t| t.kind == STRUCT && !t.name.is_empty())
        .map(|t| {
            let members = t
                .members
                .iter()
                .map(|(name, ty, off)| {
                    // With kind_flag the low 24 bits are the offset, the high 8 a bitfield size.
                    let bits = if t.kind_flag { off & 0x00ff_ffff } else { *off };
                    (name.clone(), (bits / 8) as usize, size_of_type(&types, *ty))
                })
                .collect();
            (t.name.clone(), Layout { size: t.size_or_type as usize, members })
        })
        .collect()
}

/// What differs between the C and the Rust layout of one struct, one line each.
fn differences(name: &str, c: &Layout, rust: &Layout) -> Vec<String> {
    let mut out = Vec::new();
    if c.size != rust.size {
        out.push(format!("{name}: size is {} in C, {} in Rust", c.size, rust.size));
    }
    for (field, off, size) in &c.members {
        match rust.members.iter().find(|(f, _, _)| f == field) {
            None => out.push(format!("{name}.{field}: in C (offset {off}, size {size}), missing in the Rust mirror")),
            Some((_, roff, rsize)) if (roff, rsize) != (off, size) => {
                out.push(format!("{name}.{field}: offset {off}, size {size} in C; offset {roff}, size {rsize} in Rust"))
            }
            Some(_) => {}
        }
    }
    for (field, off, _) in &rust.members {
        // Explicit padding in Rust may stand for the compiler's implicit padding in C.
        if !field.starts_with("pad") && !c.members.iter().any(|(f, _, _)| f == field) {
            out.push(format!("{name}.{field}: in the Rust mirror (offset {off}), not in C"));
        }
    }
    out
}

#[test]
fn every_shared_layout_matches_the_compiled_objects_btf() {
    // HITLESS_EBPF_DIR checks objects built elsewhere (a scratch build of a changed header).
    let ebpf = std::env::var_os("HITLESS_EBPF_DIR")
        .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf"), std::path::PathBuf::from);
    let mut problems = Vec::new();
    let mut checked = 0;
    for obj in ["steer.bpf.o", "sockops.bpf.o"] {
        let c = c_layouts(&ebpf.join(obj));
        for (name, rust) in rust_layouts() {
            // A struct only one object uses is checked in that object.
            if let Some(layout) = c.get(name) {
                checked += 1;
                problems.extend(differences(name, layout, &rust).into_iter().map(|p| format!("ebpf/{obj}: {p}")));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the Rust mirrors in agent/src/abi.rs differ from the datapath:\n{}",
        problems.join("\n")
    );
    // Every mirror was found in at least one object: a renamed C struct is no pass.
    let found: std::collections::BTreeSet<&str> = ["steer.bpf.o", "sockops.bpf.o"]
        .iter()
        .flat_map(|o| c_layouts(&ebpf.join(o)).into_keys().collect::<Vec<_>>())
        .filter_map(|n| rust_layouts().into_iter().map(|(r, _)| r).find(|r| *r == n))
        .collect();
    let missing: Vec<&str> = rust_layouts().into_iter().map(|(r, _)| r).filter(|r| !found.contains(r)).collect();
    assert!(missing.is_empty(), "no struct named {missing:?} in the objects' BTF");
    assert!(checked >= rust_layouts().len(), "checked {checked} layouts");
}

#[test]
fn a_reordered_field_is_named() {
    let c = Layout { size: 8, members: vec![("b".into(), 0, 4), ("a".into(), 4, 4)] };
    let rust = Layout { size: 8, members: vec![("a".into(), 0, 4), ("b".into(), 4, 4)] };
    let d = differences("s", &c, &rust);
    assert_eq!(
        d,
        vec![
            "s.b: offset 0, size 4 in C; offset 4, size 4 in Rust",
            "s.a: offset 4, size 4 in C; offset 0, size 4 in Rust"
        ]
    );
}
