//! Resolves an image's `User` (`name`, `uid`, `name:group`, `uid:gid`) against the image's own
//! `/etc/passwd` and `/etc/group`, as Docker does. Parsing is pure; reading the files refuses
//! symlinks so an image cannot make us read a host file.

use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd: use a numeric uid or add the user to the image")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group: use a numeric gid or add the group to the image")]
    UnknownGroup(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resolves `user` using the contents of passwd and group files (empty strings if absent).
pub fn resolve(user: Option<&str>, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let user = user.map(str::trim).filter(|u| !u.is_empty()).unwrap_or("0");
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd_entry = passwd
        .lines()
        .filter_map(parse_passwd)
        .find(|(name, uid, _)| *name == user_part || user_part.parse::<u32>().ok() == Some(*uid));
    let (name, uid, primary_gid) = match (passwd_entry, user_part.parse::<u32>()) {
        (Some((name, uid, gid)), _) => (Some(name), uid, gid),
        (None, Ok(uid)) => (None, uid, 0),
        (None, Err(_)) => return Err(UserError::UnknownUser(user_part.to_string())),
    };
    let groups: Vec<(&str, u32, Vec<&str>)> = group.lines().filter_map(parse_group).collect();
    let gid = match group_part {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|(n, _, _)| *n == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
    };
    let mut additional_gids: Vec<u32> = match (name, group_part) {
        (Some(name), None) => groups
            .iter()
            .filter(|(_, _, members)| members.contains(&name))
            .map(|(_, gid, _)| *gid)
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    additional_gids.dedup();
    Ok(ResolvedUser { uid, gid, additional_gids })
}

fn parse_passwd(line: &str) -> Option<(&str, u32, u32)> {
    let mut f = line.split(':');
    let name = f.next()?;
    let _password = f.next()?;
    let uid = f.next()?.parse().ok()?;
    let gid = f.next()?.parse().ok()?;
    Some((name, uid, gid))
}

fn parse_group(line: &str) -> Option<(&str, u32, Vec<&str>)> {
    let mut f = line.split(':');
    let name = f.next()?;
    let _password = f.next()?;
    let gid = f.next()?.parse().ok()?;
    let members = f.next().unwrap_or("").split(',').filter(|m| !m.is_empty()).collect();
    Some((name, gid, members))
}

/// Reads `<rootfs>/etc/<name>` if it is a regular file (not a symlink); empty otherwise.
pub fn read_etc_file(rootfs: &Path, name: &str) -> String {
    let path = rootfs.join("etc").join(name);
    let etc_is_dir = std::fs::symlink_metadata(rootfs.join("etc")).map(|m| m.is_dir()).unwrap_or(false);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if etc_is_dir && meta.is_file() && meta.len() < 16 << 20 => {
            std::fs::read_to_string(&path).unwrap_or_default()
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\nbad line\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\nstaff:x:50:www,other\n";

    #[test]
    fn defaults_to_root() {
        assert_eq!(resolve(None, "", ""), Ok(ResolvedUser { uid: 0, gid: 0, additional_gids: vec![] }));
    }

    #[test]
    fn by_name_with_supplementary_groups() {
        assert_eq!(
            resolve(Some("www"), PASSWD, GROUP),
            Ok(ResolvedUser { uid: 33, gid: 33, additional_gids: vec![50] })
        );
    }

    #[test]
    fn numeric_forms() {
        assert_eq!(resolve(Some("1000"), PASSWD, GROUP).map(|u| (u.uid, u.gid)), Ok((1000, 0)));
        assert_eq!(resolve(Some("1000:1000"), PASSWD, GROUP).map(|u| (u.uid, u.gid)), Ok((1000, 1000)));
        assert_eq!(resolve(Some("33"), PASSWD, GROUP).map(|u| (u.uid, u.gid)), Ok((33, 33)));
        assert_eq!(resolve(Some("www:staff"), PASSWD, GROUP).map(|u| (u.uid, u.gid)), Ok((33, 50)));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(resolve(Some("nobody"), PASSWD, GROUP), Err(UserError::UnknownUser("nobody".into())));
        assert_eq!(resolve(Some("www:wheel"), PASSWD, GROUP), Err(UserError::UnknownGroup("wheel".into())));
    }
}
