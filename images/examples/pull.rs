//! Pulls one image into a data dir and prints its record: a manual check against a real registry.
//!
//! `cargo run -p deliverous-images --example pull -- DATA_DIR REFERENCE [INSECURE_HOST...]`

use deliverous_images::{ImageStore, PullOptions, Reference};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(reference)) = (args.next(), args.next()) else {
        return Err("usage: pull DATA_DIR REFERENCE [INSECURE_HOST...]".into());
    };
    let opts = PullOptions { insecure_registries: args.collect(), ..PullOptions::default() };
    let store = ImageStore::open(dir)?;
    let reference = Reference::parse(&reference)?;
    match store.pull(&reference, &opts).await {
        Ok(image) => {
            println!("{}", serde_json::to_string_pretty(&image)?);
            for dir in store.layer_dirs(&image) {
                println!("layer {}", dir.display());
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("error (user error: {}): {e}", e.is_user_error());
            std::process::exit(1)
        }
    }
}
