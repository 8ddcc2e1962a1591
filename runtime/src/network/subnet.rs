//! `Ipv4Net`, the instances' subnet (`10.88.0.0/16`): parsing, the gateway, and which addresses
//! an instance may take.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::NetworkError;

/// An IPv4 network: a network address (host bits all zero) and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Net {
    /// `network` must have its host bits cleared (`10.88.0.0/16`, not `10.88.0.1/16`).
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, NetworkError> {
        let input = format!("{network}/{prefix_len}");
        if prefix_len > 32 {
            return Err(NetworkError::InvalidSubnet {
                input,
                reason: format!("prefix length must be 0..=32, found {prefix_len}"),
            });
        }
        let mask = mask(prefix_len);
        let bits = u32::from(network);
        if bits & !mask != 0 {
            return Err(NetworkError::InvalidSubnet {
                input,
                reason: format!("host bits are set: did you mean {}/{prefix_len}?", Ipv4Addr::from(bits & mask)),
            });
        }
        Ok(Ipv4Net { network, prefix_len })
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix_len))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix_len))
    }

    /// First host address (network + 1): the bridge's address, the instances' gateway.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// Whether `addr` may be given to an instance: inside the subnet, and neither the network
    /// address, the broadcast address, nor the gateway. Returns why not.
    pub fn check_instance_address(&self, addr: Ipv4Addr) -> Result<(), String> {
        if !self.contains(addr) {
            return Err(format!("{addr} is outside the subnet {self}"));
        }
        if addr == self.network {
            return Err(format!("{addr} is the network address of {self}"));
        }
        if addr == self.broadcast() {
            return Err(format!("{addr} is the broadcast address of {self}"));
        }
        if addr == self.first_host() {
            return Err(format!("{addr} is the gateway (bridge) address of {self}"));
        }
        Ok(())
    }
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        len => u32::MAX << (32 - u32::from(len.min(32))),
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetworkError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| NetworkError::InvalidSubnet { input: input.to_string(), reason };
        let (addr, prefix) =
            input.trim().split_once('/').ok_or_else(|| invalid("expected a.b.c.d/len, e.g. 10.88.0.0/16".into()))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| invalid(format!("{addr:?} is not an IPv4 address")))?;
        let prefix_len: u8 =
            prefix.parse().map_err(|_| invalid(format!("{prefix:?} is not a prefix length (0..=32)")))?;
        Ipv4Net::new(network, prefix_len).map_err(|e| match e {
            NetworkError::InvalidSubnet { reason, .. } => invalid(reason),
            other => other,
        })
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = NetworkError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(net: Ipv4Net) -> String {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_addresses() {
        let net: Ipv4Net = "10.88.0.0/16".parse().unwrap();
        assert_eq!(net.network(), Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(net.prefix_len(), 16);
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(net.first_host(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(net.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert_eq!(net.to_string(), "10.88.0.0/16");
        assert!(net.contains(Ipv4Addr::new(10, 88, 200, 3)));
        assert!(!net.contains(Ipv4Addr::new(10, 89, 0, 3)));
    }

    #[test]
    fn rejects_bad_input_with_a_hint() {
        let error = "10.88.0.1/16".parse::<Ipv4Net>().unwrap_err().to_string();
        assert!(error.contains("did you mean 10.88.0.0/16"), "{error}");
        for bad in ["10.88.0.0", "10.88.0.0/33", "10.88.0/16", "x/8", "10.0.0.0/-1", ""] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad} should not parse");
        }
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().netmask(), Ipv4Addr::UNSPECIFIED);
        assert_eq!("10.1.2.3/32".parse::<Ipv4Net>().unwrap().broadcast(), Ipv4Addr::new(10, 1, 2, 3));
    }

    #[test]
    fn instance_addresses() {
        let net: Ipv4Net = "10.231.7.0/24".parse().unwrap();
        assert!(net.check_instance_address(Ipv4Addr::new(10, 231, 7, 2)).is_ok());
        assert!(net.check_instance_address(Ipv4Addr::new(10, 231, 7, 254)).is_ok());
        for bad in [[10, 231, 7, 0], [10, 231, 7, 1], [10, 231, 7, 255], [10, 231, 8, 2]] {
            assert!(net.check_instance_address(Ipv4Addr::from(bad)).is_err());
        }
    }

    #[test]
    fn serde_as_string() {
        let net: Ipv4Net = serde_json::from_str("\"10.88.0.0/16\"").unwrap();
        assert_eq!(serde_json::to_string(&net).unwrap(), "\"10.88.0.0/16\"");
        assert!(serde_json::from_str::<Ipv4Net>("\"10.88.0.1/16\"").is_err());
    }
}
