//! The IP-to-country database (MaxMind DB format, records carrying `country_code`).

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use maxminddb::{PathElement, Reader};

use crate::policy::Prefix;

/// Errors from the GeoIP database.
#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    /// The database could not be opened or is not a MaxMind DB.
    #[error("GeoIP database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
    /// A lookup or the walk over all networks failed (a corrupt database).
    #[error("GeoIP database {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
}

/// The key of the country code in each record.
const COUNTRY_PATH: &[PathElement<'static>] = &[PathElement::Key("country_code")];

/// An open GeoIP database.
pub struct GeoDb {
    path: PathBuf,
    reader: Reader<Vec<u8>>,
}

impl GeoDb {
    /// Opens the database at `path` (read into memory).
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let reader = Reader::open_readfile(path).map_err(|source| GeoIpError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
        })
    }

    /// The database's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the database was built (seconds since the epoch).
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    fn read_error(&self, source: maxminddb::MaxMindDbError) -> GeoIpError {
        GeoIpError::Read {
            path: self.path.clone(),
            source,
        }
    }

    /// Country code of `ip`, if the database has one.
    pub fn country(&self, ip: IpAddr) -> Result<Option<String>, GeoIpError> {
        let found = self.reader.lookup(ip).map_err(|e| self.read_error(e))?;
        found
            .decode_path(COUNTRY_PATH)
            .map_err(|e| self.read_error(e))
    }

    /// The database's network holding `ip` and its country, if it has one.
    pub fn network(&self, ip: IpAddr) -> Result<Option<(Prefix, String)>, GeoIpError> {
        let found = self.reader.lookup(ip).map_err(|e| self.read_error(e))?;
        let Some(code) = found
            .decode_path::<String>(COUNTRY_PATH)
            .map_err(|e| self.read_error(e))?
        else {
            return Ok(None);
        };
        let net = found.network().map_err(|e| self.read_error(e))?;
        Ok(Prefix::new(net.network(), net.prefix()).map(|p| (p, code)))
    }

    /// Calls `f` with every network of the database whose country `select` maps to
    /// `Some(value)`. Records are decoded once each, not once per network.
    pub fn for_each_network<T: Copy>(
        &self,
        mut select: impl FnMut(&str) -> Option<T>,
        mut f: impl FnMut(Prefix, T),
    ) -> Result<(), GeoIpError> {
        let mut by_record: HashMap<usize, Option<T>> = HashMap::new();
        let networks = self
            .reader
            .networks(Default::default())
            .map_err(|e| self.read_error(e))?;
        for item in networks {
            let item = item.map_err(|e| self.read_error(e))?;
            let Some(offset) = item.offset() else {
                continue;
            };
            let value = match by_record.get(&offset) {
                Some(v) => *v,
                None => {
                    let code: Option<String> = item
                        .decode_path(COUNTRY_PATH)
                        .map_err(|e| self.read_error(e))?;
                    let v = code.as_deref().and_then(&mut select);
                    by_record.insert(offset, v);
                    v
                }
            };
            let Some(value) = value else {
                continue;
            };
            let net = item.network().map_err(|e| self.read_error(e))?;
            if let Some(prefix) = Prefix::new(net.network(), net.prefix()) {
                f(prefix, value);
            }
        }
        Ok(())
    }
}
