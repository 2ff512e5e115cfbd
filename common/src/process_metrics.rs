//! What every component reports about itself on `/metrics`: the process's
//! CPU, resident memory, open and allowed file descriptors and threads
//! (`process_*`, the names every Prometheus exporter uses), and
//! `homecell_build_info`, whose labels say which build is running.

/// Registers the process collector and `homecell_build_info{component,
/// version, commit}` (always 1). The binary passes its own package version
/// and the `HOMECELL_COMMIT` it was built with (`./dev` and the image
/// builds set it), so a new commit relinks only the binaries.
pub fn register(component: &str, version: &str, commit: Option<&str>) {
    #[cfg(target_os = "linux")]
    {
        let _ = prometheus::register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    }
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "homecell_build_info",
            "The running build: its component, version and commit (always 1)",
        ),
        &["component", "version", "commit"],
    )
    .expect("valid metric");
    info.with_label_values(&[
        component,
        version,
        commit.filter(|c| !c.is_empty()).unwrap_or("unknown"),
    ])
    .set(1);
    let _ = prometheus::register(Box::new(info));
}
