//! A look at a plugin file before `dlopen` runs any of its code: an ELF
//! shared object of this build's class, byte order and machine, exporting
//! the entry symbol. Each refusal says which of these failed, where the
//! loader alone would say little (or, through libloading, "dlopen failed").
//!
//! Only the ELF header, the section headers and the dynamic symbol and
//! string tables are read. A file without section headers (`sstrip`) skips
//! the symbol check and is left to the loader.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Largest dynamic symbol or string table read; a real plugin's are
/// kilobytes, this only keeps a corrupt header from asking for gigabytes.
const MAX_TABLE: u64 = 64 << 20;

const ET_DYN: u16 = 3;
const SHT_DYNSYM: u32 = 11;

/// Why a file cannot be a plugin for this build, as one sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ElfRefusal {
    /// Not a shared library of this machine at all.
    NotLoadable(String),
    /// A shared library of this machine without the entry symbol.
    NoEntry,
}

/// The ELF machine code this build runs on, and its name.
fn this_machine() -> Option<(u16, &'static str)> {
    let m = match std::env::consts::ARCH {
        "x86" => 3,
        "x86_64" => 62,
        "arm" => 40,
        "aarch64" => 183,
        "riscv64" | "riscv32" => 243,
        "powerpc64" | "powerpc" => 21,
        "s390x" => 22,
        "loongarch64" => 258,
        _ => return None,
    };
    Some((m, std::env::consts::ARCH))
}

fn machine_name(m: u16) -> &'static str {
    match m {
        3 => "x86",
        62 => "x86_64",
        40 => "arm",
        183 => "aarch64",
        243 => "riscv",
        20 => "powerpc",
        21 => "powerpc64",
        22 => "s390",
        258 => "loongarch",
        8 => "mips",
        _ => "another machine",
    }
}

/// Reads numbers of the file's class and byte order.
struct Fields {
    wide: bool,
    big: bool,
}

impl Fields {
    fn u16(&self, b: &[u8], at: usize) -> Option<u64> {
        let a: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(u64::from(if self.big {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }))
    }

    fn u32(&self, b: &[u8], at: usize) -> Option<u64> {
        let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(u64::from(if self.big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }))
    }

    fn u64(&self, b: &[u8], at: usize) -> Option<u64> {
        let a: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
        Some(if self.big {
            u64::from_be_bytes(a)
        } else {
            u64::from_le_bytes(a)
        })
    }
}

/// Checks `path` as described in the module docs. An I/O error reading it
/// is a refusal too (the loader could not read it either).
pub(crate) fn check(path: &Path, symbol: &str) -> Result<(), ElfRefusal> {
    let refuse = |why: String| Err(ElfRefusal::NotLoadable(why));
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return refuse(format!("cannot read it: {e}")),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return refuse("the file is empty".into());
    }
    let mut head = Vec::with_capacity(64);
    if let Err(e) = file.by_ref().take(64).read_to_end(&mut head) {
        return refuse(format!("cannot read it: {e}"));
    }
    if !head.starts_with(b"\x7fELF") {
        let shown: String = head
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        return refuse(format!(
            "not an ELF shared library (it starts with bytes {shown})"
        ));
    }
    if head.len() < 52 {
        return refuse(format!("a truncated ELF header ({} bytes)", head.len()));
    }
    let wide = match head[4] {
        1 => false,
        2 => true,
        c => return refuse(format!("an ELF file of unknown class {c}")),
    };
    let ours_wide = cfg!(target_pointer_width = "64");
    if wide != ours_wide {
        let bits = |w: bool| if w { 64 } else { 32 };
        return refuse(format!(
            "a {}-bit ELF library, this infl8 is {}-bit",
            bits(wide),
            bits(ours_wide)
        ));
    }
    let big = match head[5] {
        1 => false,
        2 => true,
        d => return refuse(format!("an ELF file of unknown byte order {d}")),
    };
    if big != cfg!(target_endian = "big") {
        let order = |b: bool| if b { "big-endian" } else { "little-endian" };
        return refuse(format!(
            "a {} ELF library, this infl8 is {}",
            order(big),
            order(!big)
        ));
    }
    if wide && head.len() < 64 {
        return refuse(format!("a truncated ELF header ({} bytes)", head.len()));
    }
    let f = Fields { wide, big };
    let e_type = f.u16(&head, 16).unwrap_or(0) as u16;
    if e_type != ET_DYN {
        let what = match e_type {
            1 => "a relocatable object (.o)",
            2 => "an executable",
            4 => "a core dump",
            _ => "not a shared library",
        };
        return refuse(format!("{what} (ELF type {e_type}), not a shared library"));
    }
    let machine = f.u16(&head, 18).unwrap_or(0) as u16;
    if let Some((ours, arch)) = this_machine()
        && machine != ours
    {
        return refuse(format!(
            "built for {} (ELF machine {machine}), this infl8 runs on {arch}",
            machine_name(machine)
        ));
    }
    if let Some(why) = truncated(&mut file, len, &f, &head) {
        return refuse(why);
    }
    match exports(&mut file, len, &f, &head, symbol) {
        Some(false) => Err(ElfRefusal::NoEntry),
        // Exported, or no readable section headers: the loader decides.
        _ => Ok(()),
    }
}

/// Why the file is shorter than its headers say, if it is: the loader maps
/// segments past the end of a cut file and the process dies of SIGBUS.
fn truncated(file: &mut File, len: u64, f: &Fields, head: &[u8]) -> Option<String> {
    let (phoff, phentsize, phnum) = if f.wide {
        (f.u64(head, 32)?, f.u16(head, 54)?, f.u16(head, 56)?)
    } else {
        (f.u32(head, 28)?, f.u16(head, 42)?, f.u16(head, 44)?)
    };
    let (shoff, shentsize, shnum) = if f.wide {
        (f.u64(head, 40)?, f.u16(head, 58)?, f.u16(head, 60)?)
    } else {
        (f.u32(head, 32)?, f.u16(head, 46)?, f.u16(head, 48)?)
    };
    let cut = |what: &str, end: u64| {
        Some(format!(
            "a truncated ELF file: it has {len} bytes, its {what} end at byte {end}"
        ))
    };
    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if ph_end > len {
        return cut("program headers", ph_end);
    }
    if shoff != 0 {
        let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
        if sh_end > len {
            return cut("section headers", sh_end);
        }
    }
    let min = if f.wide { 56 } else { 32 };
    if phentsize < min {
        return None;
    }
    let headers = read_at(file, len, phoff, phentsize * phnum)?;
    for ph in headers.chunks_exact(usize::try_from(phentsize).ok()?) {
        let (offset, filesz) = if f.wide {
            (f.u64(ph, 8)?, f.u64(ph, 32)?)
        } else {
            (f.u32(ph, 4)?, f.u32(ph, 16)?)
        };
        let end = offset.saturating_add(filesz);
        if end > len {
            return cut("segments", end);
        }
    }
    None
}

/// Whether the dynamic symbol table defines `symbol`; `None` when the file
/// has no (readable) section headers or dynamic symbol table.
fn exports(file: &mut File, len: u64, f: &Fields, head: &[u8], symbol: &str) -> Option<bool> {
    let (shoff, shentsize, shnum) = if f.wide {
        (f.u64(head, 40)?, f.u16(head, 58)?, f.u16(head, 60)?)
    } else {
        (f.u32(head, 32)?, f.u16(head, 46)?, f.u16(head, 48)?)
    };
    let min_entsize = if f.wide { 64 } else { 40 };
    if shoff == 0 || shnum == 0 || shentsize < min_entsize {
        return None;
    }
    let sections = read_at(file, len, shoff, shentsize.checked_mul(shnum)?)?;
    let section = |i: u64| -> Option<&[u8]> {
        let at = usize::try_from(i.checked_mul(shentsize)?).ok()?;
        sections.get(at..at + usize::try_from(shentsize).ok()?)
    };
    // (offset, size, link, entsize) of a section header.
    let fields = |s: &[u8]| -> Option<(u64, u64, u64, u64)> {
        if f.wide {
            Some((f.u64(s, 24)?, f.u64(s, 32)?, f.u32(s, 40)?, f.u64(s, 56)?))
        } else {
            Some((f.u32(s, 16)?, f.u32(s, 20)?, f.u32(s, 24)?, f.u32(s, 36)?))
        }
    };
    let dynsym = (0..shnum)
        .filter_map(section)
        .find(|s| f.u32(s, 4) == Some(u64::from(SHT_DYNSYM)))?;
    let (sym_off, sym_size, link, entsize) = fields(dynsym)?;
    let (str_off, str_size, _, _) = fields(section(link)?)?;
    let min_sym = if f.wide { 24 } else { 16 };
    if entsize < min_sym {
        return None;
    }
    let symbols = read_at(file, len, sym_off, sym_size)?;
    let strings = read_at(file, len, str_off, str_size)?;
    let want = symbol.as_bytes();
    let entsize = usize::try_from(entsize).ok()?;
    let found = symbols.chunks_exact(entsize).any(|s| {
        let name = f.u32(s, 0).and_then(|n| usize::try_from(n).ok());
        // st_shndx: 0 is an undefined (imported) symbol.
        let shndx = if f.wide { f.u16(s, 6) } else { f.u16(s, 14) };
        let named = name
            .and_then(|n| strings.get(n..))
            .is_some_and(|rest| rest.starts_with(want) && rest.get(want.len()) == Some(&0));
        named && shndx.is_some_and(|i| i != 0)
    });
    Some(found)
}

/// `size` bytes at `offset`, when they lie inside the file and the size is sane.
fn read_at(file: &mut File, len: u64, offset: u64, size: u64) -> Option<Vec<u8>> {
    if size > MAX_TABLE || offset.checked_add(size)? > len {
        return None;
    }
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut buf = vec![0u8; usize::try_from(size).ok()?];
    file.read_exact(&mut buf).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("libinfl8_x.so");
        std::fs::write(&p, bytes).unwrap();
        match check(&p, "infl8_plugin_entry") {
            Err(ElfRefusal::NotLoadable(why)) => why,
            other => panic!("{other:?}"),
        }
    }

    /// This test binary's own ELF header, edited.
    fn own_header() -> Vec<u8> {
        let exe = std::env::current_exe().unwrap();
        let mut b = std::fs::read(exe).unwrap();
        b.truncate(4096);
        b
    }

    #[test]
    fn each_kind_of_wrong_file_gets_its_own_reason() {
        assert_eq!(refusal(b""), "the file is empty");
        let e = refusal(b"#!/bin/sh\necho hi\n");
        assert!(
            e.starts_with("not an ELF shared library") && e.contains("23 21"),
            "{e}"
        );
        assert!(refusal(b"\x7fELF\x02").contains("truncated"));
        // Cut short: the loader would map segments past the end (SIGBUS).
        let mut whole = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        whole.truncate(whole.len() / 2);
        let e = refusal(&whole);
        assert!(e.starts_with("a truncated ELF file"), "{e}");

        let mut other_class = own_header();
        other_class[4] = if cfg!(target_pointer_width = "64") {
            1
        } else {
            2
        };
        assert!(refusal(&other_class).contains("-bit ELF library"));

        let mut exe = own_header();
        let at = 16;
        let v = if cfg!(target_endian = "big") {
            [0, 2]
        } else {
            [2, 0]
        };
        exe[at..at + 2].copy_from_slice(&v);
        let e = refusal(&exe);
        assert!(e.contains("an executable"), "{e}");

        let mut other_machine = own_header();
        // A test binary is position-independent (ET_DYN) on this target;
        // make it one and give it a machine no build of infl8 runs on.
        let dyn_ = if cfg!(target_endian = "big") {
            [0, 3]
        } else {
            [3, 0]
        };
        other_machine[16..18].copy_from_slice(&dyn_);
        let m = if cfg!(target_endian = "big") {
            [0, 8]
        } else {
            [8, 0]
        };
        other_machine[18..20].copy_from_slice(&m);
        let e = refusal(&other_machine);
        assert!(
            e.contains("built for mips") && e.contains("this infl8 runs on"),
            "{e}"
        );
    }
}
