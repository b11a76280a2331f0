//! Replays every seed (`fuzz/seeds/<target>/`) and every input that once crashed a
//! target (`fuzz/regressions/<target>/`) through the target's checks, so what the
//! fuzzer found stays fixed in a plain `cargo test`, without a fuzzer.

use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
}

#[test]
fn every_target_has_seeds_and_every_seed_and_regression_passes() {
    let mut replayed = 0;
    for (target, check) in ferry_fuzz_checks::TARGETS {
        let seeds = inputs("seeds", target);
        assert!(!seeds.is_empty(), "fuzz/seeds/{target}/ has no seed inputs");
        for file in seeds.iter().chain(&inputs("regressions", target)) {
            let data = std::fs::read(file).unwrap();
            eprintln!("{target}: {}", file.display());
            check(&data);
            replayed += 1;
        }
    }
    eprintln!("{replayed} inputs replayed");
}

#[test]
fn every_target_is_built_by_cargo_fuzz() {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/Cargo.toml"),
    )
    .unwrap();
    for (target, _) in ferry_fuzz_checks::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/targets/Cargo.toml has no [[bin]] for {target}"
        );
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../targets/fuzz_targets")
            .join(format!("{target}.rs"));
        let text = std::fs::read_to_string(&source).unwrap();
        assert!(
            text.contains(&format!("ferry_fuzz_checks::{target}(")),
            "{} does not call its check",
            source.display()
        );
    }
}
