//! `cargo xtask image [--tag NAME] [--base IMAGE]`: the container image of the agent and
//! the CLI (which is also the coordinator), built with buildah from `deploy/Containerfile`.
//!
//! The binaries link glibc dynamically. With the default base, `scratch`, nothing is
//! pulled: the image holds the two binaries, the exact shared libraries `ldd` lists for
//! them, the ELF loader and an `/etc/nsswitch.conf`, copied from this machine. With any
//! other base (`--base debian:12-slim`, pulled from its registry) only the binaries are
//! copied and the base's glibc is used, so it must be at least as new as this machine's.
//!
//! After the build it checks what it built: the image is listed by `buildah images`, and
//! the agent inside runs (`hitless-agent --help` in a chroot of the image's mounted root,
//! since `buildah run` cannot start a container on some machines).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::packages;

/// Where the binaries live in the image, on every base.
const BIN_DIR: &str = "usr/local/bin";
/// The binaries in the image.
const BINARIES: [&str; 2] = ["hitless-agent", "hitless"];
/// The image name unless `--tag` says otherwise.
const DEFAULT_TAG: &str = "localhost/hitless:dev";

/// `cargo xtask image [--tag NAME] [--base IMAGE]`.
pub fn image(args: &[String]) -> Result<(), String> {
    let mut tag = DEFAULT_TAG.to_owned();
    let mut base = "scratch".to_owned();
    let mut it = args.iter().filter(|a| *a != "--");
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--tag" => tag = value("--tag")?,
            "--base" => base = value("--base")?,
            other => {
                return Err(format!("cargo xtask image: unknown argument {other:?}; use [--tag NAME] [--base IMAGE]"))
            }
        }
    }
    packages::ensure(packages::IMAGE, "cargo xtask image")?;

    let mut c = crate::cargo();
    c.args(["build", "--quiet", "--release", "-p", "hitless-agent", "-p", "hitless-cli"]);
    for b in BINARIES {
        c.args(["--bin", b]);
    }
    crate::run(c, "building the release binaries")?;

    let context = crate::root().join("target/image");
    let payload = if base == "scratch" { "rootfs" } else { "bin" };
    let staged = stage(&context.join(payload), base == "scratch")?;
    println!("xtask: staged {} files in {}", staged.len(), context.join(payload).display());

    let containerfile = crate::root().join("deploy/Containerfile");
    let mut b = Command::new("buildah");
    b.args(["build", "--quiet", "--layers=false", "-f"])
        .arg(&containerfile)
        .args(["--build-arg", &format!("BASE={base}"), "--build-arg", &format!("PAYLOAD={payload}"), "-t", &tag])
        .arg(&context);
    crate::run(b, &format!("buildah build -f {} (base {base})", containerfile.display()))?;

    verify(&tag)?;
    println!(
        "xtask: image {tag} built (base {base}); push it with `buildah push {tag} docker://REGISTRY/hitless:VERSION`"
    );
    Ok(())
}

/// Fills `dir` with what the image gets: the binaries under `usr/local/bin`, and with
/// `self_contained` every library they load, at the path the loader looks for it.
fn stage(dir: &Path, self_contained: bool) -> Result<BTreeSet<PathBuf>, String> {
    let _ = std::fs::remove_dir_all(dir);
    let release = crate::root().join("target/release");
    let mut files = BTreeSet::new();
    for b in BINARIES {
        let to = dir.join(BIN_DIR).join(b);
        copy(&release.join(b), &to)?;
        files.insert(to);
    }
    if self_contained {
        let mut libs = BTreeSet::new();
        for b in BINARIES {
            libs.extend(shared_libraries(&release.join(b))?);
        }
        for lib in libs {
            // fs::copy follows symlinks: the image gets the file under the name ldd printed.
            let to = dir.join(lib.strip_prefix("/").unwrap_or(&lib));
            copy(&lib, &to)?;
            files.insert(to);
        }
        // glibc's resolver reads this for the host lookups of `--coordinator URL`.
        let nss = dir.join("etc/nsswitch.conf");
        write(&nss, "hosts: files dns\n")?;
        files.insert(nss);
    }
    Ok(files)
}

/// The absolute paths of the libraries and loader `ldd` lists for `binary` (the vDSO,
/// which the kernel provides, has no path and is left out).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd").arg(binary).output().map_err(|e| format!("running ldd: {e}"))?;
    if !out.status.success() {
        return Err(format!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let libs = parse_ldd(&text);
    if libs.is_empty() || text.contains("not found") {
        return Err(format!("ldd {} lists no usable libraries:\n{text}", binary.display()));
    }
    Ok(libs)
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and `/lib64/ld-linux-x86-64.so.2
/// (0x…)` give their path; `linux-vdso.so.1 (0x…)` gives nothing.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, right)| right.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::copy(from, to).map(|_| ()).map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Checks the image is listed, and that the agent in it runs from the image's own
/// files: `chroot <mounted root> /usr/local/bin/hitless-agent --help`.
fn verify(tag: &str) -> Result<(), String> {
    let listed =
        output(Command::new("buildah").args(["images", "--format", "{{.Name}}:{{.Tag}} {{.ID}} {{.Size}}", tag]))?;
    let line = listed.lines().next().ok_or_else(|| format!("buildah images does not list {tag}"))?;
    println!("xtask: buildah images: {line}");
    let ctr = output(Command::new("buildah").args(["from", "--pull-never", tag]))?.trim().to_owned();
    let result = (|| {
        let root = output(Command::new("buildah").args(["mount", &ctr]))?.trim().to_owned();
        let agent = format!("/{BIN_DIR}/hitless-agent");
        let help = output(Command::new("chroot").args([&root, &agent, "--help"]));
        let _ = Command::new("buildah").args(["umount", &ctr]).output();
        let help = help?;
        let first = help.lines().next().unwrap_or_default();
        if !help.contains("--node") {
            return Err(format!("chroot {root} {agent} --help printed no usage:\n{help}"));
        }
        println!("xtask: chroot <image root> {agent} --help: {first}");
        Ok(())
    })();
    let _ = Command::new("buildah").args(["rm", &ctr]).output();
    result
}

fn output(c: &mut Command) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("running {c:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{c:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_paths_and_the_vdso_none() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
                .map(PathBuf::from)
        );
    }
}
