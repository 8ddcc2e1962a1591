//! Pulls from a registry that requires a login (docker-registry with htpasswd): anonymous pulls
//! fail with an error that says what to do, credentials from our auth.json or Docker's
//! config.json work, wrong ones are named, and `check_login` tells right from wrong.

mod common;

use std::path::Path;

use base64::Engine;
use common::{layer, noise, push, Pushed, Registry};
use deliverous_images::{
    check_login, store_credentials, CredentialFiles, Error, ImageStore, LoginCheck, PullOptions, Reference,
};

const USER: &str = "deployer";
const PASSWORD: &str = "correct horse battery staple";

fn private_registry() -> (Registry, Pushed) {
    let registry = Registry::start(Some((USER, PASSWORD)));
    let layers = vec![
        layer(&[("etc/hostname".into(), b"private\n".to_vec())]),
        layer(&[("app/data.bin".into(), noise(7, 300_000))]),
    ];
    let pushed = push(&registry, "team/private:1", &layers, Some(&format!("{USER}:{PASSWORD}")));
    (registry, pushed)
}

fn store(dir: &Path, files: CredentialFiles) -> ImageStore {
    ImageStore::open(dir).unwrap().with_credentials(files)
}

#[tokio::test]
async fn private_registry_pulls() {
    let (registry, pushed) = private_registry();
    let reference = Reference::parse(&pushed.reference).unwrap();
    let host = registry.addr().to_string();
    let creds = tempfile::tempdir().unwrap();
    let auth_json = creds.path().join("etc/auth.json");
    let docker_json = creds.path().join("docker/config.json");

    // No credentials anywhere (the files do not even exist): a clear, actionable user error.
    let data = tempfile::tempdir().unwrap();
    let files = CredentialFiles::new([auth_json.clone(), docker_json.clone()]);
    let err = store(data.path(), files.clone()).pull(&reference, &PullOptions::default()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unauthorized { .. }) && err.is_user_error(), "{msg}");
    assert!(msg.contains(&format!("run `deliverous registry login {host}`")), "{msg}");
    assert!(common::leftovers(data.path()).is_empty());

    // Wrong credentials in Docker's file: the error names the user, the file and the fix.
    std::fs::create_dir_all(docker_json.parent().unwrap()).unwrap();
    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:nope"));
    std::fs::write(&docker_json, format!(r#"{{"auths": {{"http://{host}/v2/": {{"auth": "{wrong}"}}}}}}"#)).unwrap();
    let err = store(data.path(), files.clone()).pull(&reference, &PullOptions::default()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::CredentialsRejected { .. }) && err.is_user_error(), "{msg}");
    for part in [USER, &docker_json.display().to_string(), &format!("deliverous registry login {host}")] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }

    // Right credentials in our auth.json win over the wrong ones in Docker's file.
    store_credentials(&auth_json, &host, USER, PASSWORD).unwrap();
    let s = store(data.path(), files.clone());
    let image = s.pull(&reference, &PullOptions::default()).await.unwrap();
    assert_eq!(image.layers.len(), 2);
    for dir in s.layer_dirs(&image) {
        assert!(dir.is_dir(), "{}", dir.display());
    }
    assert_eq!(std::fs::read(s.layer_dirs(&image)[0].join("etc/hostname")).unwrap(), b"private\n");
    assert!(common::leftovers(data.path()).is_empty(), "{:?}", common::leftovers(data.path()));

    // Docker's file alone, with username/password fields, works too.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(
        &docker_json,
        format!(r#"{{"auths": {{"{host}": {{"username": "{USER}", "password": "{PASSWORD}"}}}}}}"#),
    )
    .unwrap();
    let image = store(fresh.path(), CredentialFiles::new([docker_json.clone()]))
        .pull(&reference, &PullOptions::default())
        .await
        .unwrap();
    assert_eq!(image.layers.len(), 2);
}

#[tokio::test]
async fn check_login_against_registries() {
    let (registry, _) = private_registry();
    let host = registry.addr();
    assert_eq!(check_login(host, USER, PASSWORD, false).await.unwrap(), LoginCheck::Accepted);
    // The way a user may write it, with a scheme.
    assert_eq!(check_login(&format!("http://{host}/"), USER, PASSWORD, true).await.unwrap(), LoginCheck::Accepted);

    for (user, password) in [(USER, "wrong"), ("nobody", PASSWORD)] {
        let err = check_login(host, user, password, false).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::LoginFailed { .. }) && err.is_user_error(), "{msg}");
        assert!(msg.contains(host) && msg.contains(user), "{msg}");
        assert!(!msg.contains(password), "the password leaked: {msg}");
    }

    let open = Registry::start(None);
    assert_eq!(check_login(open.addr(), USER, PASSWORD, false).await.unwrap(), LoginCheck::NotRequired);

    let gone = open.addr().to_string();
    drop(open);
    let err = check_login(&gone, USER, PASSWORD, false).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }) && !err.is_user_error(), "{err}");
}
