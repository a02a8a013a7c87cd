//! Generates the mesh.v1 code with the vendored protoc (or `$PROTOC` when set).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // A task's secrets must never be printed: its Debug is written by hand (src/lib.rs).
    config.skip_debug(["mesh.v1.Task", "mesh.v1.SetSecretRequest"]);
    tonic_prost_build::configure()
        // The node RPC is named Connect, which clashes with the generated transport
        // constructor; clients are built from a Channel instead.
        .build_transport(false)
        // Malformed messages are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::MeshCodec")
        .file_descriptor_set_path(out_dir.join("mesh_descriptor.bin"))
        .compile_with_config(
            config,
            &["mesh/v1/mesh.proto", "mesh/bench/v1/bench.proto"],
            &["."],
        )?;
    // prost-build does not emit this itself.
    println!("cargo:rerun-if-changed=mesh");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
